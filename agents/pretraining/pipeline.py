"""The pre-training pipeline: MTP, then VAFT from its checkpoint on its log and tokenizer, in one folder.

``ROOT/mtp`` collects the cascade log and fits the tokenizer (unless its config names them) and trains
MTP; ``ROOT/vaft`` starts from ``ROOT/mtp/checkpoint.pt`` on that log and tokenizer. A stage whose
``summary.json`` records the steps asked for is reused as it is, so every algorithm of a seed starts from
the same generator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agents.pretraining.config import PretrainConfig
from agents.pretraining.trainer import pretrain
from agents.rl import distributed
from agents.rl.distributed import SINGLE, Dist
from gpr_sim.runs import read_json


def pipeline_dir(common: PretrainConfig, folder: str = "") -> Path:
    """``folder``, else ``runs/hepo/pretrain/{env}__{seed}`` of ``common``."""
    return Path(folder or f"runs/hepo/pretrain/{common.env}__{common.seed}")


def stage_configs(
    root: Path, common: PretrainConfig, mtp_steps: int, vaft_steps: int
) -> tuple[PretrainConfig, PretrainConfig]:
    """The MTP and VAFT stages of a pipeline in ``root``: ``common``'s settings with each stage's name, steps
    and folder; VAFT reads MTP's checkpoint, log and tokenizer. Building them validates them."""
    mtp_dir, vaft_dir = root / "mtp", root / "vaft"
    mtp = dataclasses.replace(common, stage="mtp", out=str(mtp_dir), steps=mtp_steps)
    vaft = dataclasses.replace(
        common,
        stage="vaft",
        init=str(mtp_dir / "checkpoint.pt"),
        logs=str(mtp_dir / "logs.parquet"),
        tokenizer=str(mtp_dir / "tokenizer"),
        out=str(vaft_dir),
        steps=vaft_steps,
    )
    return mtp, vaft


def stage_done(folder: Path, steps: int) -> bool:
    """Whether ``folder`` holds a finished stage of ``steps`` steps (its ``summary.json`` says so)."""
    summary = folder / "summary.json"
    return summary.is_file() and read_json(summary).get("steps") == steps


def ensure_pretrained(mtp: PretrainConfig, vaft: PretrainConfig, dist: Dist = SINGLE) -> Path:
    """Run (or reuse: ``stage_done``) the MTP then the VAFT stage; returns the VAFT run folder.

    Data-parallel when ``dist`` is: every rank takes part, each on its own device.
    """
    for cfg in (mtp, vaft):
        if not stage_done(Path(cfg.out), cfg.steps):
            pretrain(distributed.on_rank_device(cfg, dist), dist)
    return Path(vaft.out)
