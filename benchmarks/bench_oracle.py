"""The oracle's whole-catalog scoring: every request against every ad, per-row candidates vs one shared row.

    python benchmarks/bench_oracle.py --device cpu --rows 16
    python benchmarks/bench_oracle.py --device cuda --rows 8192

The oracle (``agents.policies.oracle``) and the ``oracle_share`` states (``agents.evaluation.oracle_share``)
score every ad of the catalog at every request through ``gpr_sim.world.score``, in row chunks of at most
``CATALOG_CELLS`` (request, ad) pairs. Two rows of the table, interleaved (``--repeats`` rounds), the same
chunks, the same ``score(truth=True)`` and top-K:

- ``per-row``: a materialised (rows, num_ads) candidate matrix, as every caller passed before: each per-ad field
  and the D-dim embedding gathered per pair;
- ``shared``: the broadcast view the oracle passes, which ``score`` recognises (stride 0 over rows): each per-ad
  field gathered once per chunk, the interest match one GEMM;
- ``shared, compiled``: the same through ``CatalogScorer`` compiled (the oracle's default on CUDA): the element-wise
  chain fused; with ``--cells``, shared rows (eager and compiled) in fewer, larger chunks.

The floor: the least a whole-catalog top-K must move, one float64 value written and read back per pair (16 bytes),
over the measured copy bandwidth (``bench_env.copy_bandwidth``). The last column is the evaluation's step at
8,192 requests (the gpu-large final evaluation's slots) at the row's rate. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main
from agents.policies import CATALOG_CELLS, catalog_rows, row_chunks
from agents.policies.oracle import CatalogScorer
from benchmarks.bench_env import copy_bandwidth, sync
from envs import make_vec_env
from gpr_sim.runs import write_json

FLOOR_BYTES_PER_PAIR = 16
"""one float64 value written and read back per (request, ad) pair"""
FINAL_SLOTS = 8192
"""requests per step of the gpu-large final evaluation (``gpu_d3/next.sh`` FINAL_FLAGS)"""


def oracle_topk(
    vec, shared: bool, cells: int = CATALOG_CELLS, scorer: CatalogScorer | None = None
) -> torch.Tensor:
    """The oracle's action at the env's current requests (``OraclePolicy.act``'s loop), the candidate rows a
    broadcast view (``shared``) or a materialised copy, in chunks of at most ``cells`` pairs; with ``scorer``,
    the shared row through it (``CatalogScorer``, e.g. compiled)."""
    n, wc = vec.num_envs, vec.config
    eligible = vec.eligible_ads()
    all_ads = torch.arange(wc.num_ads, device=vec.device)
    out = torch.empty(n, wc.num_candidates, dtype=torch.int64, device=vec.device)
    for sl in row_chunks(n, catalog_rows(2048, wc.num_ads, cells)):
        state = vec.state.select(torch.arange(n, device=vec.device)[sl])
        if scorer is not None:
            value = scorer(state)
        else:
            cand = all_ads[None].expand(sl.stop - sl.start, -1)
            value = vec.score(cand if shared else cand.contiguous(), truth=True, state=state).value
        out[sl] = value.masked_fill(~eligible[None], float("-inf")).topk(wc.num_candidates, dim=1).indices
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="large")
    p.add_argument("--rows", type=int, default=16, help="requests scored against the whole catalog per call")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; the table keeps each row's fastest"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--cells",
        default="",
        help="comma-separated larger chunk budgets (pairs) for more shared rows: fewer, larger chunks "
        "(without the per-pair embedding gather a pair holds less memory; on a GPU fewer launches)",
    )
    p.add_argument("--out", default="benchmarks/results/oracle_scoring/bench_oracle.json")
    a = p.parse_args(argv)
    if a.rows < 1 or a.repeats < 1:
        raise ValueError(f"rows={a.rows}, repeats={a.repeats}: expected integers >= 1")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    start = time.perf_counter()
    env = make_vec_env("ads-v0", a.rows, preset=a.preset, world_seed=0, device=device, validate_actions=False)
    env.reset(seed=54321)
    vec = env.unwrapped
    print(
        f"{a.preset}: {vec.config.num_ads:,} ads, {a.rows} rows, built in {time.perf_counter() - start:.1f} s"
    )
    bandwidth = copy_bandwidth(device)
    pairs = a.rows * vec.config.num_ads
    compiled = CatalogScorer(vec, compile=True)
    modes = {
        "per-row": (False, CATALOG_CELLS, None),
        "shared": (True, CATALOG_CELLS, None),
        "shared, compiled": (True, CATALOG_CELLS, compiled),
    }
    for c in (int(x) for x in a.cells.split(",") if x.strip()):
        modes[f"shared, {c:,} pairs a chunk"] = (True, c, None)
        modes[f"shared, compiled, {c:,} pairs a chunk"] = (True, c, compiled)
    best = dict.fromkeys(modes, float("inf"))
    actions = {mode: oracle_topk(vec, *modes[mode]) for mode in modes}  # warm-up (and compile)
    for _ in range(a.repeats):
        for mode in modes:
            sync(device)
            t = time.perf_counter()
            oracle_topk(vec, *modes[mode])
            sync(device)
            best[mode] = min(best[mode], time.perf_counter() - t)
    floor = pairs * FLOOR_BYTES_PER_PAIR / bandwidth
    rows = [
        {
            "mode": mode,
            "cells": modes[mode][1],
            "seconds": s,
            "pairs_per_s": pairs / s,
            "floor_fraction": floor / s,
            "step_s_at_final_slots": s * FINAL_SLOTS / a.rows,
        }
        for mode, s in best.items()
    ]
    same = {m: float((actions["per-row"] == actions[m]).double().mean()) for m in modes}  # (ties may reorder)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; floor {floor * 1e3:.2f} ms per call ({pairs:,} pairs)")
    print("| candidates | s per call | pairs / s | floor fraction | s per step at 8,192 requests |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['seconds']:.3f} | {r['pairs_per_s']:.3g} | {r['floor_fraction']:.1%} | "
            f"{r['step_s_at_final_slots']:.2f} |"
        )
    print(
        f"speed-up of the shared row {best['per-row'] / best['shared']:.2f}x, compiled {best['per-row'] / best['shared, compiled']:.2f}x"
    )
    print(
        "the per-row path's top-K in " + ", ".join(f"{m} {v:.2%}" for m, v in same.items() if m != "per-row")
    )
    if not compiled.compiled:
        print("(the compiled rows ran eager: torch.compile failed, line above)")
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(a),
        "bandwidth_bytes_per_s": bandwidth,
        "floor_s": floor,
        "same_actions": same,
        "compiled": compiled.compiled,
        "rows": rows,
    }
    write_json(Path(a.out), record)
    print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    run_main(main)
