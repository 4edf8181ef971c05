"""The simulated ad marketplace: static world, batched functional core, and metrics."""

from gpr_sim.world.catalog import World, generate_world
from gpr_sim.world.config import RewardConfig, WorldConfig, preset
from gpr_sim.world.core import (
    CONTEXT_DIM,
    CandidateScores,
    eligible_ads,
    initial,
    observe,
    open_market,
    remaining_budget,
    score,
    transition,
)
from gpr_sim.world.reward import expected_weighted_reward, weighted_reward
from gpr_sim.world.state import MarketState, Outcome, SessionState

__all__ = [
    "World",
    "generate_world",
    "WorldConfig",
    "RewardConfig",
    "preset",
    "CONTEXT_DIM",
    "CandidateScores",
    "eligible_ads",
    "initial",
    "observe",
    "open_market",
    "remaining_budget",
    "score",
    "transition",
    "MarketState",
    "Outcome",
    "SessionState",
    "weighted_reward",
    "expected_weighted_reward",
]
