"""Tokenizer throughput and memory: quantiser fit time, encode rate, ID table + trie build, trie masks.

    python benchmarks/bench_tokenizer.py --device cpu --sizes 20000 --vae-steps 200 --out runs/bench_tokenizer_cpu.json
    python benchmarks/bench_tokenizer.py --device cuda --sizes 100000,1000000 --out runs/bench_tokenizer_cuda.json

For each N (synthetic hierarchical items): fit RQ-Kmeans, RQ-VAE and RQ-Kmeans+ (seconds, peak memory),
encode all N items, build the ``SemanticIdTable`` and a ``PrefixTrie`` over all paths, then time
legal-next-code masks for ``--mask-batch`` random prefixes at every depth: plain, with one shared (N,)
eligibility row (budget left), and with per-row (B, E) eligibility over a trie of the first
``--elig-items`` items (an ad catalog); then the masks of one pre-training minibatch (``--minibatch-rows``
target paths, every depth: ``agents.pretraining.data.legal_masks``). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and
the process's peak RSS on CPU (monotone over the run, so later rows include earlier peaks).
Prints a table last and writes JSON to ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from agents.cli import run_main
from gpr_sim.tokenizer import (
    PrefixTrie,
    RQKmeansConfig,
    RQVAEConfig,
    SemanticIdTable,
    collision_rate,
    fit_rq_kmeans,
    fit_rq_vae,
    rq_kmeans_plus_config,
)
from gpr_sim.tokenizer.compare import SyntheticConfig, hierarchical_embeddings


@dataclass(frozen=True)
class Args:
    """Benchmark settings; every field is a ``--flag``."""

    device: str = "cpu"
    """'cpu' or 'cuda'"""
    sizes: str = "100000,1000000"
    """comma-separated item counts N"""
    dim: int = 16
    """embedding width"""
    num_levels: int = 3
    """L"""
    codebook_size: int = 256
    """K (256 = the large world)"""
    kmeans_iters: int = 20
    """Lloyd iterations per level"""
    vae_steps: int = 1000
    """RQ-VAE / RQ-Kmeans+ optimiser steps"""
    batch_size: int = 4096
    """RQ-VAE minibatch"""
    hidden_dim: int = 128
    """encoder/decoder width"""
    mask_batch: int = 65536
    """B: prefixes per trie-mask call"""
    minibatch_rows: int = 4096
    """target paths of one pre-training minibatch (1,024 requests x 4 MTP heads)"""
    elig_items: int = 2000
    """E: items of the per-row eligibility trie (the (B, E) mask is B*E bools)"""
    repeats: int = 10
    """timed repetitions per mask measurement (after one warm-up)"""
    seed: int = 0
    """seed of the data and fit generators"""
    out: str = "runs/bench_tokenizer.json"
    """JSON output path"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _measure(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """Run ``fn`` once: (result, seconds, peak MB during the call on CUDA / process peak RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, _peak_mb(device)


def _time_repeated(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def bench_size(n: int, args: Args, device: torch.device) -> list[dict]:
    """All measurements for one item count; one dict per row of the final table."""
    rows: list[dict] = []

    def row(
        stage: str, seconds: float, peak: float | None = None, rate: float | None = None, unit: str = ""
    ) -> None:
        rows.append(
            {"N": n, "stage": stage, "seconds": seconds, "peak_mb": peak, "throughput": rate, "unit": unit}
        )

    gen = torch.Generator().manual_seed(args.seed)
    syn = SyntheticConfig(num_items=n, dim=args.dim, num_categories=16, subcategories_per_category=16)
    x = hierarchical_embeddings(syn, gen)[0].to(device)  # (N, D)

    common = dict(num_levels=args.num_levels, codebook_size=args.codebook_size)
    vae = dict(
        **common,
        num_steps=args.vae_steps,
        batch_size=args.batch_size,
        hidden_dim=args.hidden_dim,
        kmeans_iters=args.kmeans_iters,
    )
    fits = {
        "RQ-Kmeans": lambda g: fit_rq_kmeans(x, RQKmeansConfig(**common, num_iters=args.kmeans_iters), g),
        "RQ-VAE": lambda g: fit_rq_vae(x, RQVAEConfig(**vae), g),
        "RQ-Kmeans+": lambda g: fit_rq_vae(x, rq_kmeans_plus_config(**vae), g),
    }
    quantizer = None
    for name, fit in fits.items():
        quantizer, sec, peak = _measure(lambda fit=fit: fit(torch.Generator().manual_seed(args.seed)), device)
        row(f"fit {name}", sec, peak)
    codes, sec, peak = _measure(lambda: quantizer.encode(x), device)  # RQ-Kmeans+ codes from here on
    row("encode RQ-Kmeans+", sec, peak, n / sec, "items/s")

    table, sec, peak = _measure(lambda: SemanticIdTable(codes, args.codebook_size), device)
    row(f"id table (K_dis={table.num_dis}, collisions={collision_rate(codes):.3f})", sec, peak)
    lookup = table.item_to_path[torch.randint(n, (args.mask_batch,), generator=gen).to(device)]
    sec = _time_repeated(lambda: table.path_to_item(lookup), device, args.repeats)
    row("path_to_item", sec, None, args.mask_batch / sec, "paths/s")
    trie, sec, peak = _measure(lambda: PrefixTrie(table.item_to_path, table.level_sizes), device)
    row(f"trie build (nodes {trie.num_nodes[1:]})", sec, peak)

    pick = torch.randint(n, (args.mask_batch,), generator=gen).to(device)  # prefixes of real items
    shared = (torch.rand(n, generator=gen) < 0.8).to(device)  # 80% of items eligible
    e = min(args.elig_items, n)
    ads_trie = PrefixTrie(table.item_to_path[:e], table.level_sizes)
    ads_pick = torch.randint(e, (args.mask_batch,), generator=gen).to(device)
    per_row = (torch.rand(args.mask_batch, e, generator=gen) < 0.5).to(device)  # (B, E)
    for depth in range(trie.depth):
        prefixes = table.item_to_path[pick, :depth]  # (B, depth)
        for label, fn in (
            ("plain", lambda p=prefixes: trie.prefix_mask(p)),
            ("shared elig", lambda p=prefixes: trie.prefix_mask(p, shared)),
        ):
            sec = _time_repeated(fn, device, args.repeats)
            row(f"mask depth {depth} {label}", sec, None, args.mask_batch / sec, "rows/s")
        ads_prefixes = table.item_to_path[:e][ads_pick, :depth]
        sec = _time_repeated(lambda p=ads_prefixes: ads_trie.prefix_mask(p, per_row), device, args.repeats)
        row(f"mask depth {depth} per-row elig E={e}", sec, None, args.mask_batch / sec, "rows/s")
    targets = table.item_to_path[pick[: args.minibatch_rows]]  # (M, L') as a minibatch's target paths
    sec = _time_repeated(
        lambda: [trie.prefix_mask(targets[:, :depth]) for depth in range(trie.depth)], device, args.repeats
    )
    row(
        f"minibatch masks, every depth ({targets.shape[0]} paths)",
        sec,
        None,
        targets.shape[0] / sec,
        "paths/s",
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse flags, run every size, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = Args(**vars(p.parse_args(argv)))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    sizes = [int(s) for s in args.sizes.split(",") if s]

    rows: list[dict] = []
    for n in sizes:
        rows += bench_size(n, args, device)

    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "peak_mb_means": "cuda max_memory_allocated during the step"
        if device.type == "cuda"
        else "process peak RSS",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(
        json.dumps({"args": dataclasses.asdict(args), "info": info, "rows": rows}, indent=2) + "\n"
    )
    os.replace(tmp, out)

    print(f"# {info['device']}  torch {info['torch']}  threads {info['threads']}  -> {out}")
    print(f"{'N':>9}  {'stage':<52} {'seconds':>9} {'peak MB':>9} {'throughput':>14}")
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        rate = f"{r['throughput']:.3g} {r['unit']}" if r["throughput"] is not None else "-"
        print(f"{r['N']:>9}  {r['stage']:<52} {r['seconds']:>9.4f} {peak:>9} {rate:>14}")
    return rows


if __name__ == "__main__":
    run_main(main)
