"""Ad fatigue and leaving: how the ads shown move a user's fatigue, and the chance the session ends.

After every request the user's fatigue decays and grows by what was shown (irrelevant ads tire more);
the user then leaves with probability sigmoid(exit logit), the logit rising with the new fatigue and
falling with the user's activity tier and ad tolerance. ``core.transition`` draws the exit from these
functions; ``core.score`` uses them for the expected stay term of the reward (``stay_probability``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpr_sim.world.catalog import World
from gpr_sim.world.config import WorldConfig


def fatigue_added(cfg: WorldConfig, match: Tensor) -> Tensor:
    """Fatigue one impression adds, per ad: ``fatigue_per_ad + fatigue_irrelevance * max(0, 1 - match)``.

    ``match`` is the cosine match of the user's interest and the ad (any shape).
    """
    return cfg.fatigue_per_ad + cfg.fatigue_irrelevance * (1.0 - match).clamp(min=0.0)


def exit_probability(world: World, user_id: Tensor, fatigue: Tensor, tolerance: Tensor) -> Tensor:
    """P(the user leaves after this request) given the fatigue after it.

    Args:
        world: the static world (activity tiers, exit weights).
        user_id: (N,) users.
        fatigue: (N,) or (N, K) fatigue after the request.
        tolerance: (N,) the users' ad tolerance (hidden: ``world.user_tolerance[user_id]``).

    Returns:
        The probability, shaped like ``fatigue``.
    """
    cfg = world.config
    tier = world.user_activity[user_id].float()
    trailing = (1,) * (fatigue.dim() - tier.dim())  # per-user terms broadcast over candidates
    tier, tolerance = tier.reshape(tier.shape + trailing), tolerance.reshape(tolerance.shape + trailing)
    exit_logit = (
        cfg.exit_bias
        + cfg.exit_fatigue_weight * fatigue
        - cfg.exit_activity_weight * (tier - 3.0)
        - cfg.exit_tolerance_weight * tolerance
    )
    return torch.sigmoid(exit_logit)


def stay_probability(
    world: World, user_id: Tensor, carried: Tensor, tolerance: Tensor, match: Tensor, p_win: Tensor
) -> Tensor:
    """(N, K) P(the user stays after a request that proposes candidate k alone), i.e. E[stayed].

    The candidate is shown with probability ``p_win`` and then adds ``fatigue_added(match)``; otherwise
    the slot stays empty and only the decayed fatigue ``carried`` counts:
    P(stay) = p_win (1 - P(exit | carried + added)) + (1 - p_win) (1 - P(exit | carried)).

    Args:
        world: the static world.
        user_id: (N,) users.
        carried: (N,) fatigue before the request times ``fatigue_decay``.
        tolerance: (N,) the users' ad tolerance.
        match: (N, K) interest match of each candidate.
        p_win: (N, K) probability that the candidate wins the slot.
    """
    stay_shown = 1.0 - exit_probability(
        world, user_id, carried[:, None] + fatigue_added(world.config, match), tolerance
    )
    stay_empty = 1.0 - exit_probability(world, user_id, carried, tolerance)[:, None]  # (N, 1)
    return p_win * stay_shown + (1.0 - p_win) * stay_empty


__all__ = ["fatigue_added", "exit_probability", "stay_probability"]
