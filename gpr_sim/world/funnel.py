"""Click and conversion probabilities: the hidden truth, and the platform's imperfect estimate of it.

Truth uses the user's *current* interest (drifted by what they consumed), their fatigue, the slot
position, the hour and their latent conversion propensity. The platform's estimate (what the auction
and the default scoring API see) only knows the user's profile interest and carries a per-ad
calibration bias, larger for new ads (cold start). The gap between the two is part of what users of
this simulator study.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gpr_sim.world.catalog import World


class Probabilities(NamedTuple):
    p_click: torch.Tensor  # (N, K)
    p_conversion: torch.Tensor  # (N, K) given a click
    match: torch.Tensor  # (N, K) cosine match used


def interest_match(interest: torch.Tensor, ad_emb: torch.Tensor) -> torch.Tensor:
    """(N, D) x (N, K, D) -> (N, K) cosine match (inputs are unit norm). A (1, K, D) ``ad_emb`` is the same K
    ads for every row (``core.score``'s shared candidates, e.g. the whole catalog): one GEMM, no (N, K, D)
    gather."""
    if ad_emb.shape[0] == 1 and interest.shape[0] != 1:
        return interest @ ad_emb[0].T
    return torch.einsum("nd,nkd->nk", interest, ad_emb)


def hour_effect(hour: torch.Tensor) -> torch.Tensor:
    """Click-logit bonus peaking at 21:00 (evening browsing), +-0.15."""
    return 0.15 * torch.cos((hour - 21.0) * (2.0 * math.pi / 24.0))


def true_probabilities(
    world: World,
    ads: torch.Tensor,
    interest: torch.Tensor,
    user_id: torch.Tensor,
    fatigue: torch.Tensor,
    hour: torch.Tensor,
    slot: torch.Tensor | int = 0,
) -> Probabilities:
    """Hidden truth for ads (N, K) shown to N users at slot positions ``slot`` ((N, K) or int)."""
    cfg = world.config
    match = interest_match(interest, world.ad_emb[ads])
    ctr_logit = (
        cfg.ctr_bias
        + cfg.ctr_match_weight * match
        + cfg.ctr_quality_weight * world.ad_quality[ads]
        - cfg.position_decay * slot
        - cfg.ctr_fatigue_weight * fatigue[:, None]
        + hour_effect(hour)[:, None]
    )
    cvr_logit = cfg.cvr_bias + cfg.cvr_match_weight * match + world.user_conv_logit[user_id][:, None]
    return Probabilities(torch.sigmoid(ctr_logit), torch.sigmoid(cvr_logit), match)


def platform_probabilities(
    world: World, ads: torch.Tensor, user_id: torch.Tensor, slot: int = 0
) -> Probabilities:
    """The platform's estimate for ads (N, K): profile interest, no fatigue, per-ad bias."""
    cfg = world.config
    match = interest_match(world.user_interest[user_id], world.ad_emb[ads])
    ctr_logit = (
        cfg.ctr_bias
        + cfg.ctr_match_weight * match
        + cfg.ctr_quality_weight * world.ad_quality[ads]
        - cfg.position_decay * slot
        + world.ad_ctr_bias[ads]
    )
    cvr_logit = cfg.cvr_bias + cfg.cvr_match_weight * match + world.ad_cvr_bias[ads]
    return Probabilities(torch.sigmoid(ctr_logit), torch.sigmoid(cvr_logit), match)


def ecpm(world: World, ads: torch.Tensor, probs: Probabilities) -> torch.Tensor:
    """oCPM eCPM = 1000 x target CPA x pCTR x pCVR, (N, K)."""
    return 1000.0 * world.ad_bid[ads] * probs.p_click * probs.p_conversion
