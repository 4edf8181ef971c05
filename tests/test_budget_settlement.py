"""``WorldConfig.budget_settlement``: "in_order" (the default, unchanged) and "overdeliver" (bounded overdelivery).

Run by torchrun, this file is also the worker of the two-rank test: each rank plays its rows and saves them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from agents.rl import distributed
from agents.rl.distributed import SINGLE, Dist
from envs.ads import AdsEnv, AdsVectorEnv
from envs.market import BatchedMarket, resolve_config
from gpr_sim.world import WorldConfig, generate_world
from gpr_sim.world.auction import cap_to_budget, overdeliver_to_budget
from gpr_sim.world.core import (
    grant_in_order,
    grant_overdeliver,
    initial,
    open_market,
    settlement,
    transition,
)
from gpr_sim.world.funnel import ecpm, platform_probabilities
from gpr_sim.world.state import MarketState

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(budget_per_1k_requests=0.5, num_candidates=4, num_slots=2, steps_per_day=20)
"""small budgets (most won slots are refused in order) and 20-step days (day resets inside the run)"""
N, STEPS, SEED, WORLD_SEED = 16, 60, 1, 0


def _cap_to_budget_before_the_option(advertiser, charge, remaining):
    """``cap_to_budget`` as it was before the settlement option (verbatim): the bit-for-bit reference."""
    valid = advertiser >= 0
    adv = torch.where(valid, advertiser, torch.zeros_like(advertiser))
    amount = torch.where(valid, charge, torch.zeros_like(charge))
    order = torch.argsort(adv, stable=True)
    a, c = adv[order], amount[order]
    cum = torch.cumsum(c, 0)
    first = torch.ones_like(a, dtype=torch.bool)
    first[1:] = a[1:] != a[:-1]
    group_base = torch.cummax(torch.where(first, cum - c, torch.zeros_like(cum)), 0).values
    within = cum - group_base
    ok_sorted = within <= remaining[a]
    ok = torch.empty_like(ok_sorted).scatter_(0, order, ok_sorted)
    return ok | ~valid


def _herd_actions(step: int, rows: slice, num_ads: int, k: int) -> torch.Tensor:
    """A herd: every row proposes from the same 6 ads (shuffled per row), so a few advertisers get most charges."""
    gen = torch.Generator().manual_seed(1000 + step)
    pool = torch.randperm(num_ads, generator=gen)[:6]
    pick = torch.rand(N, 6, generator=gen).argsort(1)[:, :k]
    return pool[pick][rows]


def _play(market: BatchedMarket, dist: Dist) -> dict[str, torch.Tensor]:
    """Reset ``market`` on ``dist``'s global slots and step it: observations, outcomes, market states by step."""
    rows = distributed.shard(N, dist)
    cfg = market.config
    rec = defaultdict(list)
    obs = distributed.reset_shard(market, SEED, dist, N)
    for t in range(STEPS):
        for key, value in obs.items():
            rec[f"obs/{key}"].append(value)
        obs, out, *_ = market.step(_herd_actions(t, rows, cfg.num_ads, cfg.num_candidates))
        for key, value in out._asdict().items():
            rec[f"out/{key}"].append(value)
        for key, value in market.market._asdict().items():
            rec[f"market/{key}"].append(value)
    return {key: torch.stack(values) for key, values in rec.items()}


def _assert_equal(got: dict, want: dict, rows: slice | None = None) -> None:
    """Every recorded tensor bit for bit (``rows``: the shard's rows of the outcomes and observations)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        expect = value if key.startswith("market/") or rows is None else value[:, rows]
        assert torch.equal(got[key], expect), key


def test_in_order_settlement_is_bit_identical_to_before():
    """ "in_order" (the default until 2026-12-03, and the rule of every world saved before the field) settles a
    seeded herd rollout (budgets binding, day resets) bit for bit as the pre-option ``cap_to_budget``."""
    cfg = resolve_config("small", budget_settlement="in_order", **BASE)
    assert WorldConfig().budget_settlement == "overdeliver" and settlement(cfg) is grant_in_order
    legacy = {k: v for k, v in WorldConfig().to_dict().items() if k != "budget_settlement"}
    assert WorldConfig.from_dict(legacy).budget_settlement == "in_order"

    def reference(advertiser, charge, remaining):
        granted = _cap_to_budget_before_the_option(advertiser, charge, remaining)
        paid = granted & (advertiser >= 0)
        return granted, torch.zeros_like(remaining).index_add_(0, advertiser[paid], charge[paid])

    want = _play(BatchedMarket(cfg, N, WORLD_SEED, grant=reference), SINGLE)
    assert int(want["out/budget_capped"].sum()) > 0 and bool(want["out/impression"].any())
    _assert_equal(_play(BatchedMarket(cfg, N, WORLD_SEED), SINGLE), want)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # random settlements, the function itself
        adv = torch.randint(-1, 5, (64,), generator=gen)
        charge = torch.rand(64, generator=gen, dtype=torch.float64)
        remaining = torch.rand(5, generator=gen, dtype=torch.float64) * 4
        assert torch.equal(
            cap_to_budget(adv, charge, remaining), _cap_to_budget_before_the_option(adv, charge, remaining)
        )


def test_two_sessions_one_impression_of_budget():
    """One advertiser, two requests won at 0.3 each (hand-worked):
    - remaining 0.5: in order grants 0.3, refuses the 2nd (0.6 > 0.5); overdeliver grants both (spend before
      each: 0 < 0.5, 0.3 < 0.5): spend 0.6, overshoot 0.1 < one charge.
    - remaining 0.3: both grant the 1st only (in order 0.6 > 0.3; overdeliver: 0.3 before is not < 0.3).
    - remaining 0.1 (the leftover that stays eligible, above the 0.005 reserve): in order refuses both, and
      will again every step; overdeliver grants the 1st (0 < 0.1), spend 0.3, and the advertiser is then out.
    A row without a charge (-1) is always granted."""
    adv = torch.tensor([0, -1, 0])
    charge = torch.tensor([0.3, 0.0, 0.3], dtype=torch.float64)
    cases = {
        0.5: ([1, 1, 0], [1, 1, 1], 0.6),
        0.3: ([1, 1, 0], [1, 1, 0], 0.3),
        0.1: ([0, 1, 0], [1, 1, 0], 0.3),
    }
    for rem, (in_order, over, over_spend) in cases.items():
        remaining = torch.tensor([rem], dtype=torch.float64)
        g, spend = grant_in_order(adv, charge, remaining)
        assert g.tolist() == [bool(x) for x in in_order], rem
        assert float(spend[0]) == pytest.approx(0.3 * in_order[0] + 0.3 * in_order[2])
        g, spend = grant_overdeliver(adv, charge, remaining)
        assert g.tolist() == [bool(x) for x in over], rem
        assert float(spend[0]) == pytest.approx(over_spend)
    # an advertiser at or past its budget gets nothing
    assert overdeliver_to_budget(adv, charge, torch.tensor([0.0], dtype=torch.float64)).tolist() == [
        False,
        True,
        False,
    ]
    assert overdeliver_to_budget(adv, charge, torch.tensor([-0.2], dtype=torch.float64)).tolist() == [
        False,
        True,
        False,
    ]


def test_overdeliver_overshoots_by_less_than_one_charge():
    """Random settlements: spend < remaining + the largest granted charge, nothing granted at remaining <= 0,
    and the charges granted form a prefix of each advertiser's charges in request order; in order never
    exceeds the remaining budget."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        adv = torch.randint(-1, 6, (80,), generator=gen)
        charge = torch.rand(80, generator=gen, dtype=torch.float64)
        remaining = torch.rand(6, generator=gen, dtype=torch.float64) * 6 - 1
        g, spend = grant_overdeliver(adv, charge, remaining)
        _, spend_in_order = grant_in_order(adv, charge, remaining)
        for a in range(6):
            mine = adv == a
            got = g[mine]
            if bool(got.any()):
                assert float(remaining[a]) > 0
                assert float(spend[a]) < float(remaining[a]) + float(charge[mine][got].max())
                assert bool(got[: int(got.sum())].all())  # a prefix
            assert float(spend_in_order[a]) <= max(float(remaining[a]), 0.0)


def test_rollout_spends_within_the_stated_bound():
    """In a seeded herd rollout, "overdeliver" day spend never passes budget + the day's largest charge, and it
    shows more impressions with fewer refusals than "in_order" (the leftovers that refused all day now serve
    one last impression and leave the auction)."""
    cfg = resolve_config("small", budget_settlement="overdeliver", **BASE)
    got = _play(BatchedMarket(cfg, N, WORLD_SEED), SINGLE)
    old = _play(
        BatchedMarket(resolve_config("small", budget_settlement="in_order", **BASE), N, WORLD_SEED), SINGLE
    )
    day = torch.arange(STEPS) // cfg.steps_per_day
    over = got["market/spent_today"] - got["market/budget"]  # (T, A)
    for d in range(int(day.max()) + 1):
        steps = day == d
        largest = float(got["out/revenue"][steps].max())
        assert float(over[steps].max()) < largest
    assert int(got["out/budget_capped"].sum()) < int(old["out/budget_capped"].sum())
    assert int(got["out/impression"].sum()) > int(old["out/impression"].sum())


def test_herd_on_a_leftover_budget():
    """Construction: no competition spread (sigma 0, mean m = 20 eCPM, so every won request pays m / 1000 =
    0.02), all N rows propose one ad A whose eCPM beats m in every row, A's unpaced advertiser has 0.01 left
    (above the reserve's 0.005, so it stays eligible), T steps inside one day. In order: every row wins and is
    refused every step, capped = N T. Overdeliver: at the first step row 0 is granted (0 spent before < 0.01)
    and N - 1 are refused; then the advertiser is past its budget and inactive, so nothing more is won:
    capped = N - 1, a drop of N (T - 1) + 1."""
    n, steps, m = 32, 4, 20.0
    base = WorldConfig.small(competitor_ecpm_mean=m, competitor_ecpm_sigma=0.0, pacing_fraction=0.0)
    world = generate_world(base, 0)
    seed = torch.zeros(n, dtype=torch.int64)
    state0 = initial(
        world, seed, torch.arange(n), torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    )
    # the ad with the largest eCPM in its worst row, and above m there
    ads = torch.arange(base.num_ads)[None, :].expand(n, -1)
    worst = ecpm(world, ads, platform_probabilities(world, ads, state0.user_id)).min(0).values
    ad = int(worst.argmax())
    assert float(worst[ad]) > m
    a = int(world.ad_advertiser[ad])
    capped = {}
    for name in ("in_order", "overdeliver"):
        w = generate_world(base.replace(budget_settlement=name), 0)
        market = open_market(w, n)
        spent = market.budget.clone()
        spent[a] = market.budget[a] - 0.01
        market = MarketState(torch.ones((), dtype=torch.int64), market.budget, spent, spent.clone())
        state, total = state0, 0
        for _ in range(steps):
            state, market, out = transition(w, state, market, torch.full((n, 1), ad))
            total += int(out.budget_capped.sum())
        capped[name] = total
    assert capped["in_order"] == n * steps
    assert capped["overdeliver"] == n - 1


def test_bad_setting_names_the_field():
    with pytest.raises(ValueError, match="budget_settlement='greedy'"):
        WorldConfig(budget_settlement="greedy")


def test_single_env_equals_vector_env_under_overdeliver():
    """The single env is a B=1 view of the same core: its rollout equals the 1-row vector env's, step by step
    across sessions, while budgets bind (an advertiser overshoots its day budget: the rule is exercised)."""
    changes = dict(budget_settlement="overdeliver", budget_per_1k_requests=0.5)
    single, vec = AdsEnv(**changes), AdsVectorEnv(num_envs=1, **changes)
    single.reset(seed=3)
    vec.reset(seed=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # one budget day
        action = int(torch.randint(0, 20, (1,), generator=gen))  # 20 ads: a few advertisers, budgets bind
        _, r, term, trunc, info = single.step(action)
        _, v_r, *_, v_info = vec.step(torch.tensor([action]))
        assert r == float(v_r[0])
        assert int(info["budget_capped"]) == int(v_info["budget_capped"][0])
        if term or trunc:
            single.reset()
    market = single.engine.market
    assert torch.equal(market.spent_total, vec.engine.market.spent_total)
    assert float((market.spent_today - market.budget).max()) > 0


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    dist = distributed.init_from_env("cpu")
    try:
        cfg = resolve_config("small", budget_settlement="overdeliver", **BASE)
        market = distributed.shard_market(cfg, N, dist, WORLD_SEED)
        torch.save(_play(market, dist), out / f"rank{dist.rank}.pt")
    finally:
        distributed.cleanup(dist)


def test_two_gloo_ranks_overdeliver_as_one_process(tmp_path):
    """shard_market on 2 ranks with "overdeliver": every rank holds the single-process market state after every
    step and its rows' single-process outcomes, while budgets bind (the settlement rule reaches the gather)."""
    cfg = resolve_config("small", budget_settlement="overdeliver", **BASE)
    want = _play(BatchedMarket(cfg, N, WORLD_SEED), SINGLE)
    assert int(want["out/budget_capped"].sum()) > 0 and bool(want["out/impression"].any())
    drop = (*distributed.ENV_VARS, "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run(
        [*cmd, str(Path(__file__).resolve()), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = distributed.shard(N, Dist(rank=rank, world_size=2))
        for key, value in want.items():  # as test_distributed_market: float32 funnel values to tolerance
            expect = value if key.startswith("market/") else value[:, rows]
            exact = key.startswith("market/") or key == "out/revenue" or not value.is_floating_point()
            torch.testing.assert_close(got[key], expect, msg=key, **({"rtol": 0, "atol": 0} if exact else {}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
