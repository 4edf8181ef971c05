"""The pre-training pipeline: MTP, then VAFT from its checkpoint on its log and tokenizer, in one folder.

``ROOT/mtp`` collects the cascade log and fits the tokenizer (unless its config names them) and trains
MTP; ``ROOT/vaft`` starts from ``ROOT/mtp/checkpoint.pt`` on that log and tokenizer. A stage whose
``summary.json`` records the steps asked for is reused as it is, so every algorithm of a seed starts from
the same generator. With ``behaviour="learned-cascade"`` the MTP log is served by ``ROOT/platform``, the
learned cascade fitted on the funnel's bootstrap log (``ensure_behaviour``), the chain a real platform has.
The platform's learned pCTR / pCVR (``ensure_funnel``: ``ROOT/platform``'s funnel when the platform is
fitted, else ``ROOT/funnel``'s, fitted alike on the same log) rewards the RL learners, as the paper's simulator
uses production models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agents.platform.folder import FUNNEL_FILE as PLATFORM_FUNNEL_FILE
from agents.platform.folder import platform_fitted
from agents.pretraining.config import PretrainConfig
from agents.pretraining.data import PRIVILEGED, ensure_bootstrap_log, ensure_platform
from agents.pretraining.trainer import pretrain
from agents.rl import distributed
from agents.rl.distributed import SINGLE, Dist
from gpr_sim.data.logs import read_logs
from gpr_sim.platform.funnel import FunnelConfig, fit_funnel, save_funnel
from gpr_sim.platform.view import catalog_of
from gpr_sim.runs import read_json, write_json
from gpr_sim.world import WorldConfig, generate_world

FUNNEL_FILE = "model.pt"
"""the learned pCTR / pCVR of ``ROOT/funnel`` (``gpr_sim.platform.funnel.save_funnel``)"""


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
        else:  # a finished stage is reused as it is: never one of another behaviour's log
            done = read_json(Path(cfg.out) / "config.json").get("behaviour", PRIVILEGED)
            if done != cfg.behaviour:
                raise ValueError(
                    f"behaviour={cfg.behaviour!r} does not match {cfg.out}: its stage learned from a {done} log"
                )
    return Path(vaft.out)


def ensure_behaviour(mtp: PretrainConfig, envs: int, steps: int, dist: Dist = SINGLE) -> Path | None:
    """The learned cascade the MTP log is collected with when ``mtp.behaviour`` asks for it: ``ROOT/platform``
    fitted on the funnel's bootstrap log of ``envs`` x ``steps`` requests (``data.ensure_platform``), by the
    rank-0 process when absent; None for the privileged cascade. Call it before ``ensure_pretrained``."""
    if mtp.behaviour == PRIVILEGED:
        return None
    root = Path(mtp.out).parent
    if dist.is_main:
        ensure_platform(mtp, root, envs, steps)
    distributed.barrier(dist)
    return root / "platform"


def reward_funnel_file(root: Path) -> Path:
    """The learned funnel the pipeline in ``root`` rewards (and, with ``--auction``, ranks) through:
    ``ROOT/platform``'s when the platform is fitted, else ``ROOT/funnel/model.pt`` (``ensure_funnel``; it need
    not exist yet)."""
    platform = Path(root) / "platform"
    if platform_fitted(platform):
        return platform / PLATFORM_FUNNEL_FILE
    return Path(root) / "funnel" / FUNNEL_FILE


def ensure_funnel(mtp: PretrainConfig, envs: int, steps: int, dist: Dist = SINGLE) -> Path:
    """The platform's learned pCTR / pCVR for this pipeline (``reward_funnel_file``), fitted when absent.

    When ``ROOT/platform`` holds a fitted platform (``ensure_behaviour``), it is that platform's funnel: the same
    fit (``FunnelConfig(seed=mtp.seed)`` on the same bootstrap log) that a second fit would repeat, at a cost of
    minutes on a large log. Without a platform (``--behaviour cascade-privileged``) it is ``ROOT/funnel/model.pt``:
    the rank-0 process collects the platform's own cascade log, ``envs`` sessions x ``steps`` requests
    (``ROOT/funnel/logs.parquet``: ``data.ensure_bootstrap_log``), fits ``FunnelConfig(seed=mtp.seed)`` on it and
    writes the model and its held-out AUC / ECE (``ROOT/funnel/report.json``). Its own log because a platform's
    models learn from far more traffic than a generator's pre-training sample: on the demo's 6,400 requests the
    fit sees ~1,300 impressions and its held-out CTR AUC is below 0.5; 131,072 requests give 0.62 (the truth's:
    0.66). Every rank returns once the file exists (data-parallel jobs share it).
    """
    path = reward_funnel_file(Path(mtp.out).parent)  # the platform's exists when it is fitted
    if dist.is_main and not path.is_file():
        folder = path.parent
        logs = ensure_bootstrap_log(mtp, folder.parent, envs, steps)
        df, meta = read_logs(logs)
        world = generate_world(WorldConfig.from_dict(meta["world_config"]), meta.get("world_seed", 0))
        cfg = FunnelConfig(seed=mtp.seed)
        model, report = fit_funnel(
            df, catalog_of(world), cfg, device=mtp.device, progress=mtp.progress, world=world
        )
        write_json(folder / "report.json", {"logs": str(logs), **report})
        save_funnel(model, path)  # last: its presence says the stage is done
    distributed.barrier(dist)
    return path
