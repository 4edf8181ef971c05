"""The pre-training checkpoint format (``checkpoint.pt``, ``best.pt``): writing, reading and checking it.

A library module, so that loading a pre-trained policy (``agents.policies.gpr``) reads checkpoints
without importing the ``agents.pretrain`` entry point. The header and the safe loading are
``gpr_sim.runs``'; the model config travels as ``GPRConfig.to_dict()``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.config import LEGACY_DEFAULTS
from gpr_sim.runs import atomic_write_bytes, checkpoint_bytes, load_torch

CKPT_FORMAT = "gpr_sim.pretrain"
CKPT_VERSION = 1


def checkpoint_data(
    model: GPRModel, opt: torch.optim.Optimizer, gen: torch.Generator, step: int, stage: str
) -> bytes:
    """The serialised checkpoint: model, optimiser, sampler RNG, step and model config (what `save_checkpoint`
    writes; ``best.pt`` gets the same bytes)."""
    payload = {
        "stage": stage,
        "step": step,
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
    }
    return checkpoint_bytes(CKPT_FORMAT, CKPT_VERSION, payload)


def save_checkpoint(
    path: Path, model: GPRModel, opt: torch.optim.Optimizer, gen: torch.Generator, step: int, stage: str
) -> None:
    """Model, optimiser, sampler RNG, step and model config in one file, written atomically."""
    atomic_write_bytes(path, checkpoint_data(model, opt, gen, step, stage))


def read_checkpoint(path: str | Path) -> dict:
    """Read a pre-training checkpoint safely (``weights_only``) and check its header.

    Raises:
        ValueError: naming the file, if it is missing, unreadable, not a pre-training checkpoint, of
            another format version, or lacks the model config or weights.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no checkpoint here (expected an agents.pretrain run folder)")
    payload = load_torch(path, CKPT_FORMAT, CKPT_VERSION, "a gpr_sim pre-training checkpoint")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("model"), dict):
        raise ValueError(f"{path}: checkpoint lacks the model config or weights")
    return payload


def load_checkpoint(path: str | Path, cfg: GPRConfig) -> dict:
    """``read_checkpoint`` plus a check that it was written for a model of config ``cfg``."""
    payload = read_checkpoint(path)
    want = cfg.to_dict()
    got = {**LEGACY_DEFAULTS, **payload["config"]}  # a checkpoint from before a field: its old value
    if got != want:
        diff = sorted(k for k in want if got.get(k) != want[k])
        raise ValueError(f"{path}: checkpoint model config differs from this run's in {diff}")
    return payload


def load_model_state(path: Path, model: GPRModel, state: dict) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: model weights do not fit this model ({e})") from e
