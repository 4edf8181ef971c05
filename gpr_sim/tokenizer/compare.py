"""Fit RQ-VAE, RQ-Kmeans and RQ-Kmeans+ on the same items: the analogue of GPR Table 1.

    python -m gpr_sim.tokenizer.compare --num-items 5000 --out runs/tokenize
    python -m gpr_sim.tokenizer.compare --embeddings items.pt --out runs/tokenize

Without ``--embeddings`` the items come from a hierarchical Gaussian mixture (categories ->
sub-categories -> items, like a content taxonomy) drawn from one ``torch.Generator``. Writes
``table.csv``, ``table.json``, ``config.json`` and ``code_usage.png`` into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from gpr_sim.runs import SAFE_LOAD_ERRORS, safe_load_error
from gpr_sim.tokenizer.metrics import quantizer_metrics
from gpr_sim.tokenizer.rq_kmeans import (
    RQKmeansConfig,
    check_embeddings,
    check_float,
    check_int,
    fit_rq_kmeans,
)
from gpr_sim.tokenizer.rq_vae import RQVAEConfig, fit_rq_vae, rq_kmeans_plus_config

METHODS = ("RQ-VAE", "RQ-Kmeans", "RQ-Kmeans+")


@dataclass(frozen=True)
class SyntheticConfig:
    """Hierarchical Gaussian mixture: category centre -> sub-category centre -> item."""

    num_items: int = 5000
    """items to draw"""
    dim: int = 16
    """embedding width (16 in the small world preset)"""
    num_categories: int = 8
    """top-level categories, centres ~ N(0, category_scale^2 I)"""
    subcategories_per_category: int = 8
    """sub-categories per category, centres ~ category centre + N(0, subcategory_scale^2 I)"""
    category_scale: float = 1.0
    """spread of category centres"""
    subcategory_scale: float = 0.4
    """spread of sub-category centres around their category"""
    item_scale: float = 0.15
    """spread of items around their sub-category"""
    zipf_exponent: float = 1.0
    """sub-category popularity ~ rank^-zipf_exponent (0 = uniform): dense regions, as in real catalogs"""

    def __post_init__(self) -> None:
        check_int("num_items", self.num_items, 1, 1 << 30)
        check_int("dim", self.dim, 1, 1 << 16)
        check_int("num_categories", self.num_categories, 1, 1 << 16)
        check_int("subcategories_per_category", self.subcategories_per_category, 1, 1 << 16)
        check_float("category_scale", self.category_scale, 0.0, 1e3)
        check_float("subcategory_scale", self.subcategory_scale, 0.0, 1e3)
        check_float("item_scale", self.item_scale, 0.0, 1e3)
        check_float("zipf_exponent", self.zipf_exponent, 0.0, 10.0)


def hierarchical_embeddings(cfg: SyntheticConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw clustered item embeddings on the generator's device.

    Args:
        cfg: taxonomy sizes and spreads.
        generator: the only source of randomness.

    Returns:
        embeddings (N, D) float32 and sub-category labels (N,) int64 (category = label // subcategories).
    """
    dev = generator.device
    c, s, d = cfg.num_categories, cfg.subcategories_per_category, cfg.dim
    cat_centres = cfg.category_scale * torch.randn(c, d, generator=generator, device=dev)  # (C, D)
    sub_centres = cat_centres.repeat_interleave(s, 0) + cfg.subcategory_scale * torch.randn(
        c * s, d, generator=generator, device=dev
    )  # (C*S, D)
    ranks = torch.randperm(c * s, generator=generator, device=dev).double() + 1  # random popularity order
    probs = ranks.pow(-cfg.zipf_exponent)
    labels = torch.multinomial(probs, cfg.num_items, replacement=True, generator=generator)  # (N,)
    noise = cfg.item_scale * torch.randn(cfg.num_items, d, generator=generator, device=dev)
    return sub_centres[labels] + noise, labels


@dataclass(frozen=True)
class CompareConfig:
    """Shared settings of the three quantisers, so the comparison differs only where the methods do."""

    num_levels: int = 3
    """L: code levels"""
    codebook_size: int = 64
    """K: codes per level (64 small world, 256 large)"""
    kmeans_iters: int = 30
    """Lloyd iterations per level (RQ-Kmeans, and RQ-Kmeans+'s init)"""
    vae_steps: int = 3000
    """optimiser steps of RQ-VAE and RQ-Kmeans+"""
    batch_size: int = 1024
    """RQ-VAE minibatch size"""
    lr: float = 1e-3
    """Adam learning rate"""
    hidden_dim: int = 128
    """encoder/decoder MLP width"""
    beta: float = 0.25
    """commitment weight"""

    def __post_init__(self) -> None:
        check_int("num_levels", self.num_levels, 1, 16)
        check_int("codebook_size", self.codebook_size, 2, 1 << 16)
        check_int("kmeans_iters", self.kmeans_iters, 1, 10_000)
        check_int("vae_steps", self.vae_steps, 0, 10_000_000)
        check_int("batch_size", self.batch_size, 1, 1 << 24)
        check_float("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_int("hidden_dim", self.hidden_dim, 1, 1 << 16)
        check_float("beta", self.beta, 0.0, 100.0)

    def rq_kmeans(self) -> RQKmeansConfig:
        """RQ-Kmeans config with the shared L, K and iterations."""
        return RQKmeansConfig(
            num_levels=self.num_levels, codebook_size=self.codebook_size, num_iters=self.kmeans_iters
        )

    def _vae_fields(self) -> dict:
        return dict(
            num_levels=self.num_levels,
            codebook_size=self.codebook_size,
            num_steps=self.vae_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            hidden_dim=self.hidden_dim,
            beta=self.beta,
            kmeans_iters=self.kmeans_iters,
        )

    def rq_vae(self) -> RQVAEConfig:
        """Plain RQ-VAE: random codebooks, no residual paths."""
        return RQVAEConfig(**self._vae_fields())

    def rq_kmeans_plus(self) -> RQVAEConfig:
        """RQ-Kmeans+: the same RQ-VAE with k-means codebook init and residual encoder/decoder."""
        return rq_kmeans_plus_config(**self._vae_fields())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_quantizers(embeddings: Tensor, cfg: CompareConfig, seed: int) -> pd.DataFrame:
    """Fit the three quantisers on the same items (each from ``seed``) and measure Table-1 metrics.

    Args:
        embeddings: (N, D) item embeddings on any device.
        cfg: shared settings.
        seed: seed of each method's own ``torch.Generator`` on the embeddings' device.

    Returns:
        DataFrame indexed by method (RQ-VAE, RQ-Kmeans, RQ-Kmeans+) with columns collision_rate,
        cur_l1 .. cur_lL, pas, recon_mse, fit_seconds.
    """
    check_embeddings(embeddings)
    x = embeddings.float()
    fits = {
        "RQ-VAE": lambda g: fit_rq_vae(x, cfg.rq_vae(), g),
        "RQ-Kmeans": lambda g: fit_rq_kmeans(x, cfg.rq_kmeans(), g),
        "RQ-Kmeans+": lambda g: fit_rq_vae(x, cfg.rq_kmeans_plus(), g),
    }
    rows = []
    for name in METHODS:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        _sync(x.device)
        t0 = time.perf_counter()
        quantizer = fits[name](gen)
        _sync(x.device)
        seconds = time.perf_counter() - t0
        rows.append({"method": name, **quantizer_metrics(quantizer, x), "fit_seconds": seconds})
    return pd.DataFrame(rows).set_index("method")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``table.csv``, ``table.json`` and ``code_usage.png`` (per-level CUR and collision rate).

    Every file is written to a ``.tmp`` sibling first and moved into place with ``os.replace``.

    Returns:
        The written paths by key ``csv``, ``json``, ``png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "table.csv", "json": out / "table.json", "png": out / "code_usage.png"}
    _atomic_write_text(paths["csv"], df.to_csv())
    records = {str(k): {c: float(v) for c, v in row.items()} for k, row in df.iterrows()}
    _atomic_write_text(paths["json"], json.dumps(records, indent=2, allow_nan=True) + "\n")

    cols = [c for c in df.columns if c.startswith("cur_l")] + ["collision_rate"]
    labels = [c.replace("cur_l", "CUR L") if c.startswith("cur_l") else "collision" for c in cols]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.5))
    width = 0.8 / len(df)
    for i, (name, row) in enumerate(df.iterrows()):
        xs = [j + (i - (len(df) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [row[c] for c in cols], width, label=str(name))
    ax.set_xticks(range(len(cols)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.set_title("Code usage per level and collision rate")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = paths["png"].with_name(paths["png"].name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """CLI: fit the three quantisers and write the table; returns the DataFrame."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=str, default=None, help="a saved (N, D) float tensor (.pt)")
    p.add_argument("--num-items", type=int, default=SyntheticConfig.num_items, help="synthetic items")
    p.add_argument("--dim", type=int, default=SyntheticConfig.dim, help="synthetic embedding width")
    p.add_argument("--out", type=str, default="runs/tokenize", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    defaults = CompareConfig()
    for f in dataclasses.fields(CompareConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    args = p.parse_args(argv)
    cfg = CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)})
    device = torch.device(args.device)

    if args.embeddings is not None:
        try:
            emb = torch.load(args.embeddings, map_location="cpu", weights_only=True)
        except SAFE_LOAD_ERRORS as e:
            raise ValueError(
                f"{args.embeddings}: not a readable embeddings file ({safe_load_error(e)})"
            ) from None
        if not isinstance(emb, Tensor):
            raise ValueError(f"{args.embeddings}: expected a saved (N, D) tensor, got {type(emb).__name__}")
        source = {"embeddings": args.embeddings}
    else:
        syn = SyntheticConfig(num_items=args.num_items, dim=args.dim)
        emb, _ = hierarchical_embeddings(syn, torch.Generator().manual_seed(args.seed))
        source = {"synthetic": dataclasses.asdict(syn)}
    emb = emb.to(device)

    df = compare_quantizers(emb, cfg, args.seed)
    paths = write_table(df, args.out)
    meta = {"compare": dataclasses.asdict(cfg), "seed": args.seed, "device": str(device), **source}
    meta["num_items"], meta["dim"] = int(emb.shape[0]), int(emb.shape[1])
    _atomic_write_text(Path(args.out) / "config.json", json.dumps(meta, indent=2) + "\n")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
        print(df)
    print("wrote", ", ".join(str(v) for v in paths.values()))
    return df


if __name__ == "__main__":
    main()
