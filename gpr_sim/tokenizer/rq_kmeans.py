"""RQ-Kmeans: residual k-means, the semantic-ID quantiser fitted level by level.

Level l runs k-means on the residual left after levels 1..l-1, so an item's path (c_1, ..., c_L) goes
coarse to fine (GPR §2). Distances are computed in row chunks, so 1M items never allocate more than a
(chunk_size, K) block, and every random choice comes from an explicit ``torch.Generator``.

This file also holds what all three quantisers share: the ``Quantizer`` protocol, chunked nearest-code
search, residual encode/decode over stacked codebooks, and the versioned save/load format.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from gpr_sim.runs import SAFE_LOAD_ERRORS, safe_load_error

FILE_FORMAT = "gpr_sim.tokenizer.quantizer"
FILE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# validation and randomness helpers shared by the tokenizer configs


def check_int(name: str, value: Any, lo: int, hi: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range: expected an int in [{lo}, {hi}]")


def check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo <= value <= hi`` (``lo < value`` if ``lo_open``)."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if bad or (value <= lo if lo_open else value < lo) or value > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name}={value!r} is out of range: expected a number in {left}{lo}, {hi}]")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed: expected one of {choices}")


def randint(generator: torch.Generator, high: int, size: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform ints in [0, high) drawn on the generator's device, then moved to ``device``.

    Drawing where the generator lives lets a CPU generator drive CUDA data (and vice versa).
    """
    return torch.randint(high, size, generator=generator, device=generator.device).to(device)


def rand(generator: torch.Generator, size: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniforms in [0, 1) drawn on the generator's device, then moved to ``device``."""
    return torch.rand(size, generator=generator, device=generator.device).to(device)


def spawn_cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A fresh CPU generator seeded from ``generator``: model init is then identical on every device."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# the shared quantiser interface


@runtime_checkable
class Quantizer(Protocol):
    """What every semantic-ID quantiser offers: items -> codes -> reconstructions."""

    num_levels: int
    codebook_size: int

    def encode(self, x: Tensor) -> Tensor:
        """(N, D) float -> (N, L) int64 codes."""
        ...

    def decode(self, codes: Tensor) -> Tensor:
        """(N, L) int64 codes -> (N, D) reconstruction in the input space."""
        ...


def nearest_code(x: Tensor, codebook: Tensor, chunk_size: int = 65_536) -> tuple[Tensor, Tensor]:
    """Nearest codeword of every row, computed in row chunks.

    Args:
        x: (N, D) points.
        codebook: (K, D) codewords.
        chunk_size: rows per block; the largest temporary is (chunk_size, K).

    Returns:
        codes (N,) int64 and squared distances (N,) to the chosen codeword.
    """
    n = x.shape[0]
    c_sq = (codebook * codebook).sum(1)  # (K,)
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist2 = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk_size):
        xb = x[s : s + chunk_size]  # (n_b, D)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 without a (n_b, K, D) difference tensor
        d = torch.addmm(c_sq[None, :], xb, codebook.T, alpha=-2.0)  # (n_b, K)
        best, idx = d.min(1)
        codes[s : s + chunk_size] = idx
        dist2[s : s + chunk_size] = (best + (xb * xb).sum(1)).clamp_min(0.0)
    return codes, dist2


def residual_encode(z: Tensor, codebooks: Tensor, chunk_size: int = 65_536) -> Tensor:
    """Greedy residual quantisation: level l takes the nearest code to what levels < l left.

    Args:
        z: (N, D) latents.
        codebooks: (L, K, D) one codebook per level.
        chunk_size: rows per distance block.

    Returns:
        (N, L) int64 codes.
    """
    residual = z.clone()
    codes = torch.empty(z.shape[0], codebooks.shape[0], dtype=torch.int64, device=z.device)
    for level in range(codebooks.shape[0]):
        c, _ = nearest_code(residual, codebooks[level], chunk_size)
        codes[:, level] = c
        residual -= codebooks[level][c]
    return codes


def residual_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """Sum of the chosen codeword at every level: (N, L) codes, (L, K, D) codebooks -> (N, D)."""
    check_codes(codes, codebooks.shape[0], codebooks.shape[1])
    out = torch.zeros(codes.shape[0], codebooks.shape[2], dtype=codebooks.dtype, device=codebooks.device)
    for level in range(codebooks.shape[0]):
        out += codebooks[level][codes[:, level]]
    return out


def check_codes(codes: Tensor, num_levels: int, codebook_size: int) -> None:
    """Raise ``ValueError`` unless ``codes`` is (N, num_levels) int64 with values in [0, codebook_size)."""
    if codes.dtype != torch.int64 or codes.dim() != 2 or codes.shape[1] != num_levels:
        raise ValueError(f"codes must be (N, {num_levels}) int64, got {tuple(codes.shape)} {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
        )


def check_embeddings(x: Tensor, name: str = "embeddings") -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty (N, D) floating tensor of finite values."""
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0 or not x.is_floating_point():
        raise ValueError(f"{name} must be a non-empty (N, D) float tensor, got {tuple(x.shape)} {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


# ----------------------------------------------------------------------------------------------
# save / load: one versioned dict, readable with torch.load(weights_only=True)


def save_quantizer(module: nn.Module, path: str | os.PathLike) -> None:
    """Write ``module`` (an ``RQKmeans`` or ``RQVAE``) atomically: tmp file, then ``os.replace``."""
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "kind": module.kind,
        "config": dataclasses.asdict(module.cfg),
        "input_dim": module.input_dim,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_payload(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Read a file written by ``save_quantizer``; a corrupted or foreign file raises ``ValueError``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such quantizer file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except SAFE_LOAD_ERRORS as e:
        raise ValueError(f"{os.fspath(path)}: not a readable quantizer file ({safe_load_error(e)})") from None
    keys = {"format", "version", "kind", "config", "input_dim", "state_dict"}
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT or not keys <= payload.keys():
        raise ValueError(f"{os.fspath(path)}: not a gpr_sim quantizer file (missing format header)")
    if payload["version"] != FILE_VERSION:
        raise ValueError(
            f"{os.fspath(path)}: file version {payload['version']}, this code reads {FILE_VERSION}"
        )
    if kind is not None and payload["kind"] != kind:
        raise ValueError(f"{os.fspath(path)}: holds a {payload['kind']!r} quantizer, expected {kind!r}")
    return payload


def load_state_checked(module: nn.Module, state_dict: dict, path: str | os.PathLike) -> None:
    """``load_state_dict`` whose shape/key mismatch names the file and raises ``ValueError``."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"{os.fspath(path)}: weights do not match the stored config ({e})") from e


# ----------------------------------------------------------------------------------------------
# k-means


@dataclass(frozen=True)
class RQKmeansConfig:
    """Residual k-means: L levels of K codes, each fitted by Lloyd iterations on the residual."""

    num_levels: int = 3
    """L: code levels (path length before disambiguation)"""
    codebook_size: int = 64
    """K: codes per level"""
    num_iters: int = 30
    """Lloyd iterations per level (stops earlier once no assignment changes)"""
    init: str = "kmeans++"
    """'kmeans++' (D^2 sampling, spreads seeds over the data) or 'random' (K distinct items)"""
    init_sample_size: int = 65_536
    """k-means++ seeds from at most this many random items: it costs K passes over its sample"""
    chunk_size: int = 65_536
    """rows per distance block: the largest temporary is (chunk_size, K) floats"""

    def __post_init__(self) -> None:
        check_int("num_levels", self.num_levels, 1, 16)
        check_int("codebook_size", self.codebook_size, 2, 1 << 16)
        check_int("num_iters", self.num_iters, 1, 10_000)
        check_choice("init", self.init, ("kmeans++", "random"))
        check_int("init_sample_size", self.init_sample_size, 1, 1 << 30)
        check_int("chunk_size", self.chunk_size, 1, 1 << 30)


def _kmeanspp_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds: each next seed is drawn with probability proportional to D(x)^2. (K, D)."""
    n = x.shape[0]
    u = rand(generator, (k,), x.device)  # all uniforms up front: no host sync in the loop
    first = randint(generator, n, (1,), x.device)
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0:1] = x.index_select(0, first)  # tensor indexing, not int(): no host sync
    d2 = ((x - centroids[0]) ** 2).sum(1)  # (N,)
    for j in range(1, k):
        cdf = d2.double().cumsum(0)  # (N,)
        # inverse-CDF sampling; if every point already sits on a seed (cdf[-1] = 0) fall back to uniform
        target = torch.where(cdf[-1] > 0, u[j] * cdf[-1], u[j] * n)
        cdf = torch.where(cdf[-1] > 0, cdf, torch.arange(1, n + 1, device=x.device, dtype=cdf.dtype))
        idx = torch.searchsorted(cdf, target[None], right=True).clamp_max(n - 1)
        centroids[j : j + 1] = x.index_select(0, idx)
        d2 = torch.minimum(d2, ((x - centroids[j]) ** 2).sum(1))
    return centroids


def kmeans(x: Tensor, cfg: RQKmeansConfig, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means with chunked assignment and far-point re-seeding of empty clusters.

    Args:
        x: (N, D) points.
        cfg: ``codebook_size`` (K), ``num_iters``, ``init``, ``init_sample_size``, ``chunk_size``.
        generator: source of every random choice.

    Returns:
        (K, D) centroids.
    """
    n, k = x.shape[0], cfg.codebook_size
    if cfg.init == "kmeans++":
        sample = x
        if n > cfg.init_sample_size:
            perm = torch.randperm(n, generator=generator, device=generator.device)[: cfg.init_sample_size]
            sample = x[perm.to(x.device)]
        centroids = _kmeanspp_init(sample, k, generator)
    else:
        pick = torch.randperm(n, generator=generator, device=generator.device)[:k]
        if n < k:  # fewer items than codes: repeat items; the duplicates stay empty
            pick = randint(generator, n, (k,), generator.device)
        centroids = x[pick.to(x.device)].clone()

    prev = None
    for _ in range(cfg.num_iters):
        codes, d2 = nearest_code(x, centroids, cfg.chunk_size)
        if prev is not None and torch.equal(codes, prev):
            break  # converged: centroids are already the means of these assignments
        counts = torch.bincount(codes, minlength=k)  # (K,)
        sums = torch.zeros_like(centroids).index_add_(0, codes, x)  # (K, D)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():
            # dead codes would stay dead: move them onto the worst-served points (largest D^2)
            m = min(empty.numel(), n)
            far = torch.topk(d2, m).indices
            centroids[empty[:m]] = x[far]
        prev = codes
    return centroids


class RQKmeans(nn.Module):
    """Residual k-means quantiser: codes are greedy nearest codewords, decode sums them."""

    kind = "rq_kmeans"

    def __init__(self, cfg: RQKmeansConfig, input_dim: int) -> None:
        super().__init__()
        check_int("input_dim", input_dim, 1, 1 << 20)
        self.cfg = cfg
        self.input_dim = input_dim
        self.num_levels = cfg.num_levels
        self.codebook_size = cfg.codebook_size
        self.register_buffer("codebooks", torch.zeros(cfg.num_levels, cfg.codebook_size, input_dim))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(N, D) embeddings -> (N, L) int64 codes."""
        check_embeddings(x, "x")
        return residual_encode(x.to(self.codebooks.dtype), self.codebooks, self.cfg.chunk_size)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(N, L) int64 codes -> (N, D) reconstruction (sum of the path's codewords)."""
        return residual_decode(codes, self.codebooks)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write of config + codebooks; read back with ``RQKmeans.load``."""
        save_quantizer(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RQKmeans:
        """Read a file written by ``save``; a wrong kind, shape or corrupted file raises ``ValueError``."""
        payload = read_payload(path, cls.kind)
        model = cls(RQKmeansConfig(**payload["config"]), payload["input_dim"])
        load_state_checked(model, payload["state_dict"], path)
        return model.to(map_location)


def fit_rq_kmeans(embeddings: Tensor, cfg: RQKmeansConfig, generator: torch.Generator) -> RQKmeans:
    """Fit residual k-means level by level (GPR §2, step 1 of RQ-Kmeans+).

    Args:
        embeddings: (N, D) item embeddings, any device; the quantiser lives on the same device.
        cfg: levels, codebook size and k-means settings.
        generator: source of every random choice (any device).

    Returns:
        The fitted ``RQKmeans``.
    """
    check_embeddings(embeddings)
    x = embeddings.float()
    model = RQKmeans(cfg, x.shape[1]).to(x.device)
    residual = x.clone()  # (N, D)
    for level in range(cfg.num_levels):
        centroids = kmeans(residual, cfg, generator)  # (K, D)
        codes, _ = nearest_code(residual, centroids, cfg.chunk_size)
        model.codebooks[level] = centroids
        residual -= centroids[codes]
    return model
