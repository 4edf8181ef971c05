"""A policy's exact action distribution pi(. | x) on the current requests, for the policies that have one.

Off-policy evaluation (``agents.ope``: propensities of a target policy) and ``oracle_share`` (the expected
value of what a stochastic policy serves) both need the probabilities, not samples; one home for both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from agents.policies.cascade import CascadePolicy
from agents.policies.learned_cascade import LearnedCascadePolicy
from agents.policies.oracle import OraclePolicy
from agents.policies.random import RandomPolicy


class Dist(NamedTuple):
    """A policy's action distribution per request, on its support."""

    ads: torch.Tensor  # (N, P) int64 ads with possibly non-zero probability (may be a broadcast view)
    prob: torch.Tensor  # (N, P) float64, rows sum to 1 (may be a broadcast view)


def action_distribution(policy, obs: dict[str, torch.Tensor]) -> Dist:
    """pi(. | x) of a single-candidate policy on the current requests (N of them)."""
    n = obs["user_id"].shape[0]
    if isinstance(policy, RandomPolicy):
        num_ads, device = policy.env.config.num_ads, policy.env.device
        # broadcast views, no (N, num_ads) copies: 2,048 requests x the large preset's 1M ads would be 32 GiB
        ads = torch.arange(num_ads, device=device).expand(n, num_ads)
        return Dist(
            ads, torch.full((1, num_ads), 1.0 / num_ads, dtype=torch.float64, device=device).expand(n, -1)
        )
    if isinstance(policy, (CascadePolicy, LearnedCascadePolicy)):  # softmax(logits / T) over a pool
        pool, logits = policy.pool(obs)  # the pool and logits act samples from (one ranking, not a copy)
        t = policy.config.temperature
        if t == 0:  # greedy: the top of the ranking, as act picks it
            top = logits.topk(1, dim=1).indices
            return Dist(pool.gather(1, top), torch.ones(n, 1, dtype=torch.float64, device=pool.device))
        return Dist(pool, torch.softmax((logits / t).double(), dim=1))  # act's float64 softmax of logits/t
    if isinstance(policy, OraclePolicy):
        pick = policy.act(obs).action[:, :1]
        return Dist(pick, torch.ones(n, 1, dtype=torch.float64, device=pick.device))
    raise ValueError(f"no action distribution for {type(policy).__name__}")


def prob_of(dist: Dist, ads: torch.Tensor) -> torch.Tensor:
    """(N,) probability of ``ads`` (N,) under ``dist``."""
    return (dist.prob * (dist.ads == ads[:, None])).sum(1)


__all__ = ["Dist", "action_distribution", "prob_of"]
