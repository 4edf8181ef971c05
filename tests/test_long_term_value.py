"""Long-term value is real: a myopic value maximiser earns less per session than a fatigue-aware one.

Each check runs one session per env slot to its end (max_steps bounds it), with the same users and
random streams for both policies (same seed), and compares total session reward pairwise.
"""

import math

import torch

from agents.policies.oracle import FATIGUE_AWARE_PENALTY, OraclePolicy
from envs.market import BatchedMarket
from gpr_sim.world import WorldConfig


def first_session_returns(cfg: WorldConfig, policy_factory, num_envs: int, seed: int) -> torch.Tensor:
    market = BatchedMarket(cfg, num_envs, world_seed=seed)
    obs = market.reset(seed=seed)
    policy = policy_factory(market)
    total = torch.zeros(num_envs, dtype=torch.float64)
    live = torch.ones(num_envs, dtype=torch.bool)
    for _ in range(cfg.max_steps):
        obs, out, _, _, _ = market.step(policy.act(obs).action)
        total += out.reward.double() * live
        live &= ~(out.terminated | out.truncated)
    assert not live.any()
    return total


def test_fatigue_aware_beats_myopic_on_several_seeds():
    cfg = WorldConfig.small()
    diffs, report = [], []
    for seed in (0, 1, 2):
        myopic = first_session_returns(cfg, lambda m: OraclePolicy(m), 2048, seed)
        aware = first_session_returns(cfg, lambda m: OraclePolicy(m, FATIGUE_AWARE_PENALTY), 2048, seed)
        d = aware - myopic
        half = 1.96 * d.std().item() / math.sqrt(d.numel())
        report.append((seed, myopic.mean().item(), aware.mean().item(), d.mean().item(), half))
        diffs.append(d)
        # Per seed: the paired 95% interval of (aware - myopic) lies above zero.
        assert d.mean().item() - half > 0, report
    print("seed, myopic, aware, diff, 95% half-width:", report)
