"""THE reward formula: hand-worked values, and expected values that average to the realised reward.

The statistical tests run 4096 sessions x 25 steps (102,400 requests) of a small world under the
non-default weights revenue 2, GMV 0.05, click 0.01, conversion 0.5, stay 0.1, with budgets that never
bind, and check that the scoring API's true value of each proposed ad, the OPE ground truth and the
scoring API's P(stay) each average to what the env realised, within 4 standard errors of the mean
per-request difference.
"""

import math

import numpy as np
import pytest
import torch

from agents.collection import collect
from agents.evaluation import offpolicy
from agents.policies import PolicyOutput
from envs import make_vec_env
from gpr_sim.world import WorldConfig, expected_weighted_reward, generate_world, weighted_reward
from gpr_sim.world.config import RewardConfig
from gpr_sim.world.fatigue import stay_probability

WEIGHTS = RewardConfig(revenue=2.0, gmv=0.05, click=0.01, conversion=0.5, stay=0.1)
SMALL = dict(num_ads=200, num_advertisers=20, num_organic=500, num_users=2000, budget_per_1k_requests=1e6)
NUM_ENVS, STEPS = 4096, 25  # 102,400 requests


def test_weighted_reward_by_hand():
    # price 0.3, GMV 120, 1 click, 1 conversion, stayed: 2 x 0.3 + 0.05 x 120 + 0.01 + 0.5 + 0.1 = 7.21;
    # nothing shown and the user left: 0.
    r = weighted_reward(
        WEIGHTS,
        torch.tensor([0.3, 0.0]),
        torch.tensor([120.0, 0.0]),
        torch.tensor([1, 0]),
        torch.tensor([1, 0]),
        torch.tensor([True, False]),
    )
    torch.testing.assert_close(r, torch.tensor([7.21, 0.0]))


def test_expected_weighted_reward_by_hand():
    # E[price] 0.2, P(click) 0.1, pCVR 0.05, order value 100, P(stay) 0.9: conversions 0.1 x 0.05 = 0.005,
    # GMV 0.005 x 100 = 0.5; 2 x 0.2 + 0.05 x 0.5 + 0.01 x 0.1 + 0.5 x 0.005 + 0.1 x 0.9 = 0.5185.
    one = torch.ones(1, dtype=torch.float64)
    v = expected_weighted_reward(WEIGHTS, 0.2 * one, 0.1 * one, 0.05 * one, 100.0 * one, 0.9 * one)
    torch.testing.assert_close(v, torch.tensor([0.5185], dtype=torch.float64))


def test_stay_probability_by_hand():
    # Default exit model: logit = -3.4 + 0.8 fatigue - 0.25 (tier - 3) - 0.5 tolerance. Carried fatigue
    # 0.5, match 0.6: a shown ad adds 0.1 + 2 x (1 - 0.6) = 0.9. With tier 4 and tolerance 1:
    # shown: -3.4 + 0.8 x 1.4 - 0.25 - 0.5 = -3.03; empty: -3.4 + 0.8 x 0.5 - 0.75 = -3.75.
    # P(win) 0.25: P(stay) = 0.25 (1 - s(-3.03)) + 0.75 (1 - s(-3.75)).
    world = generate_world(WorldConfig.small(**SMALL), seed=0)
    user = int(torch.nonzero(world.user_activity == 4)[0])
    p = stay_probability(
        world,
        torch.tensor([user]),
        torch.tensor([0.5]),
        torch.tensor([1.0]),
        torch.tensor([[0.6]]),
        torch.tensor([[0.25]]),
    )

    def s(x):
        return 1.0 / (1.0 + math.exp(-x))

    want = 0.25 * (1.0 - s(-3.03)) + 0.75 * (1.0 - s(-3.75))
    assert p.shape == (1, 1) and p.item() == pytest.approx(want, rel=1e-5)


class BestOfFour:
    """Proposes the best of 4 random ads by the platform's scoring API: a state-dependent policy whose ads
    win some auctions and lose others."""

    def __init__(self, env, seed: int):
        self.env = env.unwrapped
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs):
        n = obs["user_id"].shape[0]
        cand = torch.randint(0, self.env.config.num_ads, (n, 4), generator=self.generator)
        pick = cand.gather(1, self.env.score(cand).value.argmax(1, keepdim=True))  # (n, 1)
        return PolicyOutput(pick, torch.ones(n, dtype=torch.float64))


def scored(env, obs, out):
    """Per request, before the step: the scoring API's true value and P(stay) of the proposed ad."""
    s = env.unwrapped.score(out.action, truth=True)
    return {"value": s.value[:, 0].double(), "p_stay": s.p_stay[:, 0].double()}


@pytest.fixture(scope="module")
def weighted_run():
    env = make_vec_env(
        "ads-v0", NUM_ENVS, config=WorldConfig.small(**SMALL, reward=WEIGHTS), world_seed=0, device="cpu"
    )
    columns, extra = collect(env, BestOfFour(env, seed=1), seed=1, steps=STEPS, hook=scored, progress=False)
    return columns, extra, env.unwrapped.world


def assert_same_mean(realised: np.ndarray, expected: np.ndarray) -> None:
    """|mean(realised - expected)| < 4 standard errors of that mean."""
    diff = realised - expected
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(diff.mean()) < 4 * se, (realised.mean(), expected.mean(), se)


def test_run_is_large_and_unconstrained(weighted_run):
    columns, _, _ = weighted_run
    assert columns["reward"].size >= 100_000
    # the run exercises every term: wins and losses, clicks, conversions, exits; budgets never refuse
    assert 0.1 < columns["impression"].mean() < 0.9
    assert (
        columns["click"].sum() > 1000
        and columns["conversion"].sum() > 100
        and columns["terminated"].sum() > 1000
    )


def test_score_value_averages_to_the_realised_reward(weighted_run):
    columns, extra, _ = weighted_run
    assert_same_mean(columns["reward"], extra["value"])


def test_score_stay_probability_averages_to_the_realised_stay_rate(weighted_run):
    columns, extra, _ = weighted_run
    assert_same_mean((~columns["terminated"]).astype(np.float64), extra["p_stay"])


def test_ope_ground_truth_averages_to_the_realised_reward(weighted_run):
    columns, _, world = weighted_run
    assert_same_mean(columns["reward"], offpolicy.denoised_reward(columns, world))
