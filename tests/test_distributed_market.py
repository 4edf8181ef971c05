"""The exact data-parallel market: ranks that settle charges together (all-gather, gloo) equal one process.

Run by torchrun, this file is also the worker: each rank plays its rows of the market and saves them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from agents.rl import distributed
from agents.rl.distributed import SINGLE, Dist
from envs.market import BatchedMarket, resolve_config
from gpr_sim.world.auction import cap_to_budget
from gpr_sim.world.core import grant_in_order

ROOT = Path(__file__).resolve().parents[1]
CFG = resolve_config(
    "small",
    budget_per_1k_requests=0.5,
    num_candidates=4,
    num_slots=2,
    steps_per_day=20,
    budget_settlement="in_order",  # spend never exceeds budget: the rule these hooks were written for
)
"""small budgets (most won slots get capped) and 20-step budget days (three day resets in the run)"""
N, STEPS, SEED, WORLD_SEED = 16, 60, 1, 0


def _actions(step: int, rows: slice) -> torch.Tensor:
    """The candidates of global ``rows`` at ``step``: one fixed draw over all N rows, sliced."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.num_ads, (N, CFG.num_candidates), generator=gen)[rows]


def _play(market: BatchedMarket, dist: Dist) -> dict[str, torch.Tensor]:
    """Reset ``market`` on ``dist``'s global slots and step it: observations, outcomes, market states by step."""
    rows = distributed.shard(N, dist)
    rec = defaultdict(list)
    obs = distributed.reset_shard(market, SEED, dist, N)
    for t in range(STEPS):
        for key, value in obs.items():
            rec[f"obs/{key}"].append(value)
        obs, out, *_ = market.step(_actions(t, rows))
        for key, value in out._asdict().items():
            rec[f"out/{key}"].append(value)
        for key, value in market.market._asdict().items():
            rec[f"market/{key}"].append(value)
    return {key: torch.stack(values) for key, values in rec.items()}


def _assert_same(got: dict, want: dict, rows: slice | None = None) -> None:
    """The market states whole, observations and outcomes (dim 1 is the row) on ``rows`` of ``want``.

    Bit for bit, except with ``rows`` (another batch width) for float32 outcomes other than the revenue
    (what the grant settles): funnel probabilities and true eCPM may differ in the last bit at another
    width, market or not (vectorized loop body vs scalar tail), so they get float32 tolerance.
    """
    assert got.keys() == want.keys()
    for key, value in want.items():
        market = key.startswith("market/")
        expect = value if market or rows is None else value[:, rows]
        exact = rows is None or market or key == "out/revenue" or not value.is_floating_point()
        tol = {"rtol": 0, "atol": 0} if exact else {}
        torch.testing.assert_close(got[key], expect, msg=key, **tol)


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    dist = distributed.init_from_env("cpu")
    try:
        market = distributed.shard_market(CFG, N, dist, WORLD_SEED)
        torch.save(_play(market, dist), out / f"rank{dist.rank}.pt")
    finally:
        distributed.cleanup(dist)


def test_default_grant_settles_as_before_the_hook():
    """transition's default grant is the pre-hook settlement: cap_to_budget over the row-major charges,
    spend = the granted charges summed per advertiser in that order; the 1-process shard is the same."""

    def reference(advertiser, charge, remaining):
        granted = cap_to_budget(advertiser, charge, remaining)
        paid = granted & (advertiser >= 0)
        return granted, torch.zeros_like(remaining).index_add_(0, advertiser[paid], charge[paid])

    want = _play(BatchedMarket(CFG, N, WORLD_SEED), SINGLE)
    assert int(want["out/budget_capped"].sum()) > 0 and bool(want["out/impression"].any())
    _assert_same(_play(BatchedMarket(CFG, N, WORLD_SEED, grant=reference), SINGLE), want)
    assert distributed.grant_across_ranks(SINGLE) is grant_in_order
    _assert_same(_play(distributed.shard_market(CFG, N, SINGLE, WORLD_SEED), SINGLE), want)


def test_per_rank_budget_shares_drift_once_budgets_bind():
    """Why the exact mode exists: W markets with 1/W of each budget serve other impressions than one."""
    one = BatchedMarket(CFG, N, WORLD_SEED)
    want = _play(one, SINGLE)
    halves = [
        _play(BatchedMarket(CFG, N // 2, world=one.world), Dist(rank=r, world_size=2)) for r in range(2)
    ]
    got = {key: torch.cat([h[key] for h in halves], dim=1) for key in want if not key.startswith("market/")}
    torch.testing.assert_close(halves[0]["market/budget"] + halves[1]["market/budget"], want["market/budget"])
    for key in ("obs/user_id", "obs/organic"):  # the same sessions start in the same rows
        torch.testing.assert_close(got[key][0], want[key][0], rtol=0, atol=0)
    assert not torch.equal(got["out/impression"], want["out/impression"])
    assert not torch.equal(got["out/budget_capped"], want["out/budget_capped"])
    # each share is capped on its own, so together they never overspend the global budget
    spent = halves[0]["market/spent_today"] + halves[1]["market/spent_today"]
    assert bool((spent <= want["market/budget"]).all())


def test_two_gloo_ranks_hold_the_one_process_market(tmp_path):
    """shard_market on 2 ranks: every rank holds the single-process market state after every step, and
    its rows' observations and outcomes are the single-process rows, while budgets bind."""
    want = _play(BatchedMarket(CFG, N, WORLD_SEED), SINGLE)
    assert int(want["out/budget_capped"].sum()) > 0 and bool(want["out/impression"].any())
    drop = (*distributed.ENV_VARS, "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).resolve()),
        str(tmp_path),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(got, want, distributed.shard(N, Dist(rank=rank, world_size=2)))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
