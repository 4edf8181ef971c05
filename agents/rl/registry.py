"""The RL algorithms by ``--algo`` name: adding one is one file (an ``Algorithm``) and one line here."""

from __future__ import annotations

from agents.rl.common import Algorithm
from agents.rl.dpo import DPO
from agents.rl.grpo import GRPO
from agents.rl.hepo import HEPO
from agents.rl.ppo import PPO
from agents.rl.sibling_grpo import SIBLING_GRPO

ALGOS: dict[str, Algorithm] = {a.name: a for a in (HEPO, PPO, GRPO, SIBLING_GRPO, DPO)}
"""name -> algorithm, in the order the CLI help lists them"""


def algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``; ValueError naming the known ones otherwise."""
    if name not in ALGOS:
        raise ValueError(f"algo={name!r} is unknown: expected one of {list(ALGOS)}")
    return ALGOS[name]


__all__ = ["ALGOS", "algorithm"]
