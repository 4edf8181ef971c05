"""RQ-VAE and RQ-Kmeans+: an MLP autoencoder whose latent is residual-quantised by L codebooks.

Plain RQ-VAE (the baseline) starts from small random codebooks; codes that no latent is nearest to
get no gradient and stay dead (codebook collapse). RQ-Kmeans+ (GPR §2) changes two ingredients, each
its own flag so every ablation is one config away:

| flag | RQ-VAE | RQ-Kmeans+ | why |
|---|---|---|---|
| ``codebook_init`` | ``"random"`` | ``"kmeans"`` | codebooks = RQ-Kmeans fitted on the encoder's initial latents: every code starts in use |
| ``residual_encoder`` | False | True | z = x + f(x), f near zero at init: latents start at the data, so the k-means codebooks fit |
| ``residual_decoder`` | False | True | x_hat = z_q + g(z_q): our choice (the paper names the encoder only); the model starts as identity |

Loss (both): reconstruction + codebook + beta * commitment, with a straight-through estimator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpr_sim.tokenizer.rq_kmeans import (
    RQKmeans,
    RQKmeansConfig,
    check_choice,
    check_embeddings,
    check_float,
    check_int,
    fit_rq_kmeans,
    load_state_checked,
    nearest_code,
    randint,
    read_payload,
    residual_decode,
    residual_encode,
    save_quantizer,
    spawn_cpu_generator,
)


@dataclass(frozen=True)
class RQVAEConfig:
    """RQ-VAE training setup. Defaults are the plain RQ-VAE; ``rq_kmeans_plus_config()`` flips the flags."""

    num_levels: int = 3
    """L: code levels"""
    codebook_size: int = 64
    """K: codes per level"""
    hidden_dim: int = 128
    """width of the encoder and decoder MLPs"""
    num_hidden_layers: int = 2
    """hidden layers per MLP (ReLU between layers)"""
    latent_dim: int | None = None
    """latent width; None = the input width (required by the residual encoder/decoder)"""
    beta: float = 0.25
    """commitment weight: pulls the encoder towards its chosen codewords"""
    lr: float = 1e-3
    """Adam learning rate (encoder, decoder and codebooks)"""
    batch_size: int = 1024
    """items per minibatch (sampled with replacement)"""
    num_steps: int = 3000
    """optimiser steps: cost does not grow with the number of items"""
    codebook_init: str = "random"
    """'random' (uniform in [-1/K, 1/K], the classic VQ init) or 'kmeans' (RQ-Kmeans on initial latents)"""
    residual_encoder: bool = False
    """z = x + f(x) instead of z = f(x)"""
    residual_decoder: bool = False
    """x_hat = z_q + g(z_q) instead of x_hat = g(z_q)"""
    residual_init_scale: float = 0.01
    """the residual branch's last layer is scaled by this at init so f(x) ~ 0 (residual flags only)"""
    kmeans_iters: int = 30
    """Lloyd iterations per level for ``codebook_init='kmeans'``"""
    chunk_size: int = 65_536
    """rows per block when encoding many items"""

    def __post_init__(self) -> None:
        check_int("num_levels", self.num_levels, 1, 16)
        check_int("codebook_size", self.codebook_size, 2, 1 << 16)
        check_int("hidden_dim", self.hidden_dim, 1, 1 << 16)
        check_int("num_hidden_layers", self.num_hidden_layers, 1, 16)
        if self.latent_dim is not None:
            check_int("latent_dim", self.latent_dim, 1, 1 << 16)
        check_float("beta", self.beta, 0.0, 100.0)
        check_float("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_int("batch_size", self.batch_size, 1, 1 << 24)
        check_int("num_steps", self.num_steps, 0, 10_000_000)
        check_choice("codebook_init", self.codebook_init, ("random", "kmeans"))
        for name in ("residual_encoder", "residual_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        check_float("residual_init_scale", self.residual_init_scale, 0.0, 1.0)
        check_int("kmeans_iters", self.kmeans_iters, 1, 10_000)
        check_int("chunk_size", self.chunk_size, 1, 1 << 30)


def rq_kmeans_plus_config(**overrides) -> RQVAEConfig:
    """RQ-Kmeans+ (GPR §2): k-means codebook init + residual encoder/decoder; other fields overridable."""
    fields = {"codebook_init": "kmeans", "residual_encoder": True, "residual_decoder": True}
    return RQVAEConfig(**{**fields, **overrides})


class RQVAELosses(NamedTuple):
    """Named loss terms of one minibatch; ``loss`` is what is minimised."""

    loss: Tensor
    recon: Tensor
    codebook: Tensor
    commitment: Tensor


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    """Linear-ReLU stack built without init (``skip_init``): weights are set from a generator later."""
    dims = [d_in] + [hidden] * layers + [d_out]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(torch.nn.utils.skip_init(nn.Linear, dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class RQVAE(nn.Module):
    """Encoder MLP -> residual quantisation with L codebooks -> decoder MLP."""

    kind = "rq_vae"

    def __init__(self, cfg: RQVAEConfig, input_dim: int) -> None:
        super().__init__()
        check_int("input_dim", input_dim, 1, 1 << 20)
        latent = cfg.latent_dim if cfg.latent_dim is not None else input_dim
        if (cfg.residual_encoder or cfg.residual_decoder) and latent != input_dim:
            raise ValueError(
                f"latent_dim={latent} must equal the input dim {input_dim} with a residual encoder/decoder"
            )
        self.cfg = cfg
        self.input_dim = input_dim
        self.latent_dim = latent
        self.num_levels = cfg.num_levels
        self.codebook_size = cfg.codebook_size
        self.encoder = _mlp(input_dim, cfg.hidden_dim, latent, cfg.num_hidden_layers)
        self.decoder = _mlp(latent, cfg.hidden_dim, input_dim, cfg.num_hidden_layers)
        self.codebooks = nn.Parameter(torch.empty(cfg.num_levels, cfg.codebook_size, latent))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch-default-like uniform init from ``generator`` (a CPU generator for CPU weights)."""
        for mlp, residual in (
            (self.encoder, self.cfg.residual_encoder),
            (self.decoder, self.cfg.residual_decoder),
        ):
            linears = [m for m in mlp if isinstance(m, nn.Linear)]
            for lin in linears:
                bound = lin.in_features**-0.5
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.uniform_(-bound, bound, generator=generator)
            if residual:  # f(x) ~ 0 at init: the latent starts at the input
                linears[-1].weight.mul_(self.cfg.residual_init_scale)
                linears[-1].bias.zero_()
        k = self.cfg.codebook_size
        self.codebooks.uniform_(-1.0 / k, 1.0 / k, generator=generator)

    def embed(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, D_z) latent."""
        f = self.encoder(x)
        return x + f if self.cfg.residual_encoder else f

    def reconstruct(self, z_q: Tensor) -> Tensor:
        """(N, D_z) quantised latent -> (N, D)."""
        g = self.decoder(z_q)
        return z_q + g if self.cfg.residual_decoder else g

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Residual quantisation with per-level codebook and commitment terms.

        Args:
            z: (B, D_z) latents.

        Returns:
            z_q (B, D_z) with straight-through gradient to z, codes (B, L), codebook loss, commitment loss.
        """
        residual = z
        z_q = torch.zeros_like(z)
        codes = torch.empty(z.shape[0], self.num_levels, dtype=torch.int64, device=z.device)
        codebook_loss = z.new_zeros(())
        commit_loss = z.new_zeros(())
        for level in range(self.num_levels):
            c, _ = nearest_code(residual.detach(), self.codebooks[level].detach(), self.cfg.chunk_size)
            q = self.codebooks[level][c]  # (B, D_z)
            codebook_loss = codebook_loss + F.mse_loss(q, residual.detach())  # moves codewords to data
            commit_loss = commit_loss + F.mse_loss(residual, q.detach())  # keeps the encoder near its codes
            codes[:, level] = c
            z_q = z_q + q
            residual = residual - q.detach()
        z_st = z + (z_q - z).detach()  # straight-through: forward z_q, gradient as if identity
        return z_st, codes, codebook_loss, commit_loss

    def loss(self, x: Tensor) -> RQVAELosses:
        """RQ-VAE loss of a minibatch (B, D): recon + codebook + beta * commitment."""
        z_st, _, codebook_loss, commit_loss = self.quantize(self.embed(x))
        recon = F.mse_loss(self.reconstruct(z_st), x)
        total = recon + codebook_loss + self.cfg.beta * commit_loss
        return RQVAELosses(total, recon, codebook_loss, commit_loss)

    @torch.no_grad()
    def latents(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, D_z) latents, in row chunks."""
        check_embeddings(x, "x")
        x = x.to(self.codebooks.dtype)
        return torch.cat(
            [self.embed(x[s : s + self.cfg.chunk_size]) for s in range(0, x.shape[0], self.cfg.chunk_size)]
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(N, D) embeddings -> (N, L) int64 codes."""
        z = self.latents(x)
        return residual_encode(z, self.codebooks, self.cfg.chunk_size)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(N, L) int64 codes -> (N, D) reconstruction."""
        z_q = residual_decode(codes, self.codebooks)
        return torch.cat(
            [
                self.reconstruct(z_q[s : s + self.cfg.chunk_size])
                for s in range(0, z_q.shape[0], self.cfg.chunk_size)
            ]
        )

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write of config + weights; read back with ``RQVAE.load``."""
        save_quantizer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RQVAE:
        """Read a file written by ``save``; a wrong kind, shape or corrupted file raises ``ValueError``."""
        payload = read_payload(path, cls.kind)
        model = cls(RQVAEConfig(**payload["config"]), payload["input_dim"])
        load_state_checked(model, payload["state_dict"], path)
        return model.to(map_location)


def fit_rq_vae(embeddings: Tensor, cfg: RQVAEConfig, generator: torch.Generator) -> RQVAE:
    """Train an RQ-VAE (or RQ-Kmeans+, per ``cfg``'s flags) with Adam on random minibatches.

    Args:
        embeddings: (N, D) item embeddings, any device; the model trains there.
        cfg: architecture, ingredient flags and optimisation settings.
        generator: source of every random choice (weights, k-means seeds, minibatches).

    Returns:
        The trained ``RQVAE`` in eval mode.
    """
    check_embeddings(embeddings)
    x = embeddings.float()
    n = x.shape[0]
    model = RQVAE(cfg, x.shape[1])
    model.reset_parameters(spawn_cpu_generator(generator))  # weights identical on every device
    model.to(x.device)
    if cfg.codebook_init == "kmeans":  # GPR §2 step 2: RQ-Kmeans codebooks on the initial latents
        km_cfg = RQKmeansConfig(
            num_levels=cfg.num_levels,
            codebook_size=cfg.codebook_size,
            num_iters=cfg.kmeans_iters,
            chunk_size=cfg.chunk_size,
        )
        with torch.no_grad():
            model.codebooks.copy_(fit_rq_kmeans(model.latents(x), km_cfg, generator).codebooks)

    # fused Adam on CUDA: the step is launch-bound (tiny MLP), one kernel instead of one per tensor
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=x.is_cuda)
    model.train()
    block = max(1, min(cfg.num_steps, (1 << 22) // cfg.batch_size))  # steps per host->device index copy
    for step in range(cfg.num_steps):
        if step % block == 0:  # one copy per block: a per-step pageable copy would stall the CUDA queue
            indices = randint(generator, n, (min(block, cfg.num_steps - step), cfg.batch_size), x.device)
        losses = model.loss(x[indices[step % block]])
        opt.zero_grad(set_to_none=True)
        losses.loss.backward()
        opt.step()
    return model.eval()


def load_quantizer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RQKmeans | RQVAE:
    """Load any quantizer file, dispatching on the ``kind`` stored in it."""
    kind = read_payload(path)["kind"]
    classes = {RQKmeans.kind: RQKmeans, RQVAE.kind: RQVAE}
    if kind not in classes:
        raise ValueError(
            f"{os.fspath(path)}: unknown quantizer kind {kind!r}, expected one of {sorted(classes)}"
        )
    return classes[kind].load(path, map_location)
