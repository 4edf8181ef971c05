"""agents.rl.rollout's realised rewards (``outcome="realised"``): unbiased draws of the expected value the
scoring API gives, keyed like the rollout's other draws, and the same sampled paths as the expected outcome."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agents.rl.rollout import Roller, realised_rewards
from gpr_sim.model import GPRModel
from gpr_sim.world import CandidateScores
from gpr_sim.world.config import RewardConfig
from gpr_sim.world.reward import weighted_reward
from tests.test_rollout_incremental import _market


def test_realised_rewards_average_to_the_expected_value():
    """Over M independent draws of the same (request, candidate) the mean realised reward lies within 5
    standard errors of the expected value the scoring API's formula gives (``weighted_reward`` of P(win) x
    E[price | win], P(win) pCTR pCVR x order value, P(win) pCTR, P(win) pCTR pCVR, P(stay)), for every cell;
    every reward weight is non-zero. Probabilities are moderate so each outcome happens often in M draws
    (rare events make the sample's standard error meaningless); the draws are seeded, so not flaky."""
    gen = torch.Generator().manual_seed(0)
    n, k, m = 4, 3, 20_000

    def probs(lo, hi):
        return lo + (hi - lo) * torch.rand(n, k, generator=gen)

    p_win, p_click, p_conv, p_stay = probs(0.3, 0.9), probs(0.1, 0.5), probs(0.1, 0.5), probs(0.5, 0.95)
    price = probs(0.5, 2.0)  # E[price | win]
    items = torch.arange(n * k).view(n, k)
    value_mean = 10 + 90 * torch.rand(n * k, generator=gen)
    weights = RewardConfig(revenue=1.0, gmv=0.02, click=0.1, conversion=0.5, stay=0.3)
    world = SimpleNamespace(config=SimpleNamespace(reward=weights), ad_value_mean=value_mean)
    revenue, gmv = p_win * price, p_win * p_click * p_conv * value_mean[items]
    want = weighted_reward(weights, revenue, gmv, p_win * p_click, p_win * p_click * p_conv, p_stay)
    zero = torch.zeros(n, k)
    scores = CandidateScores(p_click, p_conv, zero, p_win, revenue, gmv, p_stay, want)
    reps = CandidateScores(*(f.repeat(m, 1) for f in scores))
    u = torch.rand(m * n, 4 * k, generator=gen).clamp(1e-7, 1 - 1e-7)
    draws = realised_rewards(world, items.repeat(m, 1), reps, u).view(m, n, k).double()
    mean, se = draws.mean(0), draws.std(0) / m**0.5
    assert bool((se > 0).all())
    assert bool(((mean - want.double()).abs() <= 5 * se).all()), ((mean - want) / se).abs().max()


def test_realised_rollout_keeps_the_paths_and_draws_its_rewards():
    """``outcome="realised"``: the same sampled paths as ``"expected"`` (its draws have their own keys),
    rewards that differ from the expected ones but match them on average; unknown outcomes fail."""
    bufs = {}
    for outcome in ("expected", "realised"):
        env, tok, cfg = _market()
        torch.manual_seed(0)
        model = GPRModel(cfg).eval()
        roller = Roller(env, tok, group_size=5, estimator="truth", arr_rate=1.0, seed=3, outcome=outcome)
        roller.reward_scale = 1.0  # same units for both
        bufs[outcome], _ = roller.collect(model, 2)
    exp, real = bufs["expected"], bufs["realised"]
    assert torch.equal(exp.codes, real.codes) and torch.equal(exp.rehearsed, real.rehearsed)
    assert not torch.equal(exp.reward, real.reward)
    diff = (real.reward - exp.reward).double().flatten()
    assert abs(float(diff.mean())) <= 5 * float(diff.std()) / diff.numel() ** 0.5  # unbiased, loosely
    with pytest.raises(ValueError, match="outcome='sampled' is unknown"):
        Roller(env, tok, group_size=5, estimator="truth", arr_rate=0.0, seed=3, outcome="sampled")
