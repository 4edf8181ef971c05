"""The RL run's checkpoint (``OUT/checkpoint.pt``): model, optimiser and every rank's rollout state, enough to
resume a run exactly (``agents.rl.trainer``)."""

from __future__ import annotations

from pathlib import Path

import torch

from agents.rl import distributed
from agents.rl.distributed import SINGLE, Dist
from agents.rl.rollout import Roller
from gpr_sim.model import GPRModel
from gpr_sim.runs import load_torch, save_torch

CKPT_FORMAT = "gpr_sim.hepo"
CKPT_VERSION = 2
"""2: keyed rollout draws and minibatch order (no generator states); the env state of every rank"""


def _cpu(x):
    """``x`` (tensors in dicts and tuples) with every tensor on the CPU: what ranks exchange as objects."""
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_cpu(v) for v in x)
    return x.cpu() if isinstance(x, torch.Tensor) else x


def save_checkpoint(
    path: Path, model: GPRModel, opt, roller: Roller, it: int, env_steps: int, dist: Dist = SINGLE
):
    """Rank 0 writes model, optimiser and every rank's env state (collective: every rank calls it)."""
    rollers = distributed.gather_objects(_cpu(roller.state_dict()), dist)
    if not dist.is_main:
        return
    payload = {
        "iteration": it,
        "env_steps": env_steps,
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rollers": rollers,
    }
    save_torch(path, CKPT_FORMAT, CKPT_VERSION, payload)


def read_checkpoint(path: Path) -> dict:
    """Read an RL checkpoint safely (``weights_only``); errors name the file and what is wrong."""
    return load_torch(
        path,
        CKPT_FORMAT,
        CKPT_VERSION,
        "an agents.hepo checkpoint",
        ("model", "optimizer", "rollers", "iteration", "env_steps"),
    )
