"""The pre-training checkpoint format (``checkpoint.pt``, ``best.pt``): writing, reading and checking it.

A library module, so that loading a pre-trained policy (``agents.policies.gpr``) reads checkpoints
without importing the ``agents.pretrain`` entry point. The header and the safe loading are
``gpr_sim.runs``'; the model config travels as ``GPRConfig.to_dict()``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.config import LEGACY_DEFAULTS, ZERO_INIT_COLUMNS, ZERO_INIT_WIDTHS
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


def check_config(path: str | Path, stored: dict, cfg: GPRConfig) -> None:
    """Raise ``ValueError`` naming the fields unless the checkpoint's config ``stored`` is ``cfg``."""
    want = cfg.to_dict()
    got = {**LEGACY_DEFAULTS, **stored}  # a checkpoint from before a field: its old value
    if got != want:
        diff = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
        raise ValueError(f"{path}: checkpoint model config differs from this run's in {diff}")


def load_checkpoint(path: str | Path, cfg: GPRConfig) -> dict:
    """``read_checkpoint`` plus a check that it was written for a model of config ``cfg``."""
    payload = read_checkpoint(path)
    check_config(path, payload["config"], cfg)
    return payload


def load_init(path: str | Path, model: GPRModel) -> list[str]:
    """Load checkpoint ``path``'s weights into ``model`` (``--init``); returns the widths added at zero.

    The checkpoint's config must be the model's, except that the model may turn on a zero-initialised width
    the checkpoint lacks (``ZERO_INIT_WIDTHS``: an MTP checkpoint from before ``hte_ad_features``) or a
    layout switch that appends dense columns (``ZERO_INIT_COLUMNS``: one from before ``market_features``).
    Those parameters (columns) are loaded as zeros, so the model computes exactly what the checkpoint's
    model did; every other weight must fit as in a plain load.

    Raises:
        ValueError: naming the file, as ``read_checkpoint``, on any other config difference, or if the
            weights do not fit.
    """
    payload = read_checkpoint(path)
    added = model.cfg.added_zero_widths(payload["config"])
    if added is None:
        check_config(path, payload["config"], model.cfg)  # raises, naming the differing fields
    own = model.state_dict()
    prefixes = tuple(ZERO_INIT_WIDTHS[name] for name in added or () if name in ZERO_INIT_WIDTHS)
    zeros = {k: torch.zeros_like(v) for k, v in own.items() if k.startswith(prefixes)} if prefixes else {}
    for key in {ZERO_INIT_COLUMNS[name] for name in added or () if name in ZERO_INIT_COLUMNS}:
        stored = payload["model"].get(key)
        if stored is None or stored.shape[0] != own[key].shape[0] or stored.shape[1] > own[key].shape[1]:
            shape = None if stored is None else tuple(stored.shape)
            raise ValueError(f"{path}: weight {key} is {shape}, the model's {tuple(own[key].shape)}")
        wide = torch.zeros_like(own[key])
        wide[:, : stored.shape[1]] = stored  # the new columns come last (gpr_sim.schema)
        zeros[key] = wide
    load_model_state(Path(path), model, {**payload["model"], **zeros})
    return added


def load_model_state(path: Path, model: GPRModel, state: dict) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: model weights do not fit this model ({e})") from e
