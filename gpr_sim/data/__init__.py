"""Logged-bandit data and off-policy estimators (numpy / pandas only).

`gpr_sim.data.obd` (Open Bandit Dataset reader) is not imported here so that
`python -m gpr_sim.data.obd` runs without a double-import warning.
"""

from gpr_sim.data.bandit import LoggedBandit
from gpr_sim.data.ope import (
    WeightStats,
    direct_method,
    doubly_robust,
    estimate_all,
    independent_ips,
    ips,
    position_breakdown,
    snips,
    weight_stats,
)

__all__ = [
    "LoggedBandit",
    "WeightStats",
    "direct_method",
    "doubly_robust",
    "estimate_all",
    "independent_ips",
    "ips",
    "position_breakdown",
    "snips",
    "weight_stats",
]
