"""What the platform's spend ledger says about the market at a request: the E token's market features.

A platform knows its advertisers' budgets, what it has charged them today and whom its pacing holds back:
it keeps that ledger itself. ``market_features`` summarises it, from the ``MarketState`` and the advertisers'
observable account settings (budget, pacing flag; ``gpr_sim.world.core.budget_day`` applies the platform's
own day length, pacing slack and reserve), into a few numbers per request that ``gpr_sim.schema`` appends
to the E token's dense columns. It is the one function for live observations (``envs``:
``market_features()`` of either env) and for logs (``agents.collection`` records its value per request in
the ``market`` column), so both give the same tensors.

| column | value | why it matters |
|---|---|---|
| ``eligible_share`` | share of advertisers who may bid in the next auction (remaining budget covers the reserve and, if paced, on schedule) | how much competition is left: with few bidders, fewer ads can win and prices fall |
| ``throttled_share`` | share of advertisers with budget left whom pacing holds out (spent share > day share + slack) | demand that returns later in the day; ``1 - eligible - throttled`` ran dry |
| ``spent_share`` | mean over advertisers of spend today / daily budget, clipped to [0, 1] | how far the day's budgets are used up |
| ``day_progress`` | share of the budget day elapsed once this request is served (the pacing clock) | when budgets reset; the session's hour of day (context) is the user's clock, not the ledger's |

All four are unitless shares in [0, 1]: they do not depend on the market's size or currency (budgets scale
with the traffic, ``open_market``), so one model reads markets of any width. They are the same for every
request of a step (the market is shared; a data-parallel shard's market moves by the global spend, so
every shard sees the same values). Nothing here reads a hidden field: no user, interest, fatigue, funnel
or creative quality (``gpr_sim.platform.view``), only the ledger.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpr_sim.world.catalog import World
from gpr_sim.world.core import budget_day
from gpr_sim.world.state import MarketState

MARKET_FEATURES = ("eligible_share", "throttled_share", "spent_share", "day_progress")
"""column names of ``market_features`` (the module docstring's table)"""
MARKET_FEATURE_DIM = len(MARKET_FEATURES)
"""F_m: market feature columns of an E token"""


def market_features(world: World, market: MarketState) -> Tensor:
    """(F_m,) float32 market features of the next request (module docstring), on the market's device.

    Computed in float64 from the ledger and cast once, so the same market gives the same values wherever
    it is read (an env's observation path and the collection that logs them).
    """
    day = budget_day(world, market)
    a = day.active.shape[0]
    throttled = day.has_budget & ~day.active
    spent = (day.spent_today / market.budget.clamp_min(1e-12)).clamp(0.0, 1.0)
    columns = (
        day.active.double().sum() / a,
        throttled.double().sum() / a,
        spent.mean(),
        day.day_fraction.clamp(max=1.0),
    )
    return torch.stack(columns).to(torch.float32)


__all__ = ["MARKET_FEATURES", "MARKET_FEATURE_DIM", "market_features"]
