"""THE reward formula: one weighted sum of a request's value signals, realised or expected.

    r = w.revenue * revenue + w.gmv * gmv + w.click * clicks + w.conversion * conversions + w.stay * stayed

with the weights ``w`` of ``RewardConfig``. Every place that needs a reward calls ``weighted_reward`` (or
``expected_weighted_reward``, the same call on expectations): the env's realised reward (``core.transition``),
the scoring API (``core.score``), the HTE pre-training targets (``gpr_sim.model.targets.value_targets``)
and the off-policy ground truth (``agents.evaluation.offpolicy.denoised_reward``).

**Why one formula.** The formula is linear in the signals, so E[reward(signals)] = reward(E[signals]):
feeding it the expectations of the signals gives an unbiased value of the realised reward exactly when
every expectation is right and every term is there. Written out once per caller, the copies drifted
(the scoring API and the HTE targets lost the stay bonus; the OPE ground truth did not weight revenue)
and their values stopped averaging to the reward the env pays. With one function a new term or weight
reaches every caller at once.

| signal | realised (``transition``) | expected for a proposed ad (``score``) |
|---|---|---|
| revenue | price charged, summed over slots | E[price] = P(win) x E[second price given a win] |
| gmv | order value of the conversions reported now (delayed ones included) | P(win) pCTR pCVR x mean order value |
| clicks | clicks over slots | P(win) pCTR |
| conversions | conversions reported now (delayed ones included) | P(win) pCTR pCVR |
| stayed | 1 when the user did not leave after the request (truncation counts as staying) | P(stay), ``gpr_sim.world.fatigue.stay_probability`` |

Delayed conversions move a conversion's credit to the request that reports it; the expected form credits
it to the request that earned it, which has the same total over a session.
"""

from __future__ import annotations

from torch import Tensor

from gpr_sim.world.config import RewardConfig


def weighted_reward(
    weights: RewardConfig, revenue: Tensor, gmv: Tensor, clicks: Tensor, conversions: Tensor, stayed: Tensor
) -> Tensor:
    """The weighted sum of one request's value signals, all broadcast together (e.g. (N,) or (N, K)).

    Args:
        weights: the world's reward weights (``WorldConfig.reward``).
        revenue: price charged to advertisers, or its expectation.
        gmv: attributed order value, or its expectation.
        clicks: clicks (a count), or the click probability.
        conversions: conversions (a count), or the probability of a click and a conversion.
        stayed: bool, 1 where the user stays in the session after the request, or P(stay).

    Returns:
        The reward, in the dtype the arithmetic promotes to (float32 for float32 signals).
    """
    return (
        weights.revenue * revenue
        + weights.gmv * gmv
        + weights.click * clicks
        + weights.conversion * conversions
        + weights.stay * stayed
    )


def expected_weighted_reward(
    weights: RewardConfig,
    revenue: Tensor,
    p_click: Tensor,
    p_conversion: Tensor,
    order_value: Tensor,
    p_stay: Tensor,
) -> Tensor:
    """``weighted_reward`` of the expected signals, from the funnel's probabilities.

    Args:
        weights: the world's reward weights.
        revenue: expected price charged.
        p_click: probability of a click (with whatever the caller conditions on: P(win) x pCTR for a
            proposed ad, pCTR for an ad known to be shown).
        p_conversion: probability of a conversion given a click (pCVR).
        order_value: mean order value of the ad (GMV per conversion).
        p_stay: probability that the user stays in the session after the request.

    Returns:
        ``weighted_reward(weights, revenue, p_click pCVR order_value, p_click, p_click pCVR, p_stay)``.
    """
    conversions = p_click * p_conversion
    return weighted_reward(weights, revenue, conversions * order_value, p_click, conversions, p_stay)


__all__ = ["weighted_reward", "expected_weighted_reward"]
