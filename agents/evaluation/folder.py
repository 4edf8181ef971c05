"""An ``agents.evaluate`` output folder: a comparison run into it, with its config, tables, charts, paired table.

    run = evaluate_folder(EvalConfig(agents=("random", "cascade-privileged", "oracle")), "runs/eval/NAME")
    run.comparison.summary                      # one row per agent; run.paired with EvalConfig.reference

The one home of what the command line and the notebooks both do: the folder is a ``gpr_sim.runs.RunFolder``
owned by ``agents.evaluate`` (locked while written, refused when another entry point owns it; evaluations with
other settings share it, each agent's sessions cached under ``agents/``), and ``config.json`` records the
settings that the reports check the baseline's protocol against (``agents.reporting.folders.check_protocol``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from agents.evaluation.compare import Comparison, EvalConfig, compare_agents, write_comparison
from agents.evaluation.paired import paired_table, write_paired
from gpr_sim.runs import RunFolder, write_json

OWNER = "agents.evaluate"
"""the owner of evaluation folders (``gpr_sim.runs.RunFolder``)"""


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_folder`` ran and wrote."""

    comparison: Comparison
    """every agent's summary, strata, sessions and per-state values"""
    paired: pd.DataFrame | None
    """with ``EvalConfig.reference``: every other agent minus it (``paired_table``); else None"""
    path: Path
    """the folder"""
    written: tuple[str, ...]
    """the files written into ``path`` (beside ``run.json`` and the ``agents/`` cache), by name"""


def eval_settings(cfg: EvalConfig, plots: bool = True) -> dict[str, Any]:
    """The settings of ``cfg`` as ``config.json`` records them: one key per ``agents.evaluate`` flag, so a
    folder written from a notebook reads like one written from the command line."""
    return {
        "env": cfg.env,
        "agents": ",".join(cfg.agents),
        "preset": cfg.preset,
        "world_seed": cfg.world_seed,
        "num_envs": cfg.num_envs,
        "sessions": cfg.sessions,
        "seed": cfg.seed,
        "device": cfg.device,
        "oracle_states": cfg.oracle_states,
        "ci": cfg.ci.method,
        "level": cfg.ci.level,
        "n_bootstrap": cfg.ci.n_bootstrap,
        "plots": plots,
        "rerun": cfg.rerun,
        "reference": cfg.reference or "",
    }


def evaluate_folder(
    cfg: EvalConfig, out: str | Path, plots: bool = True, settings: dict[str, Any] | None = None
) -> Evaluation:
    """Compare ``cfg.agents`` into the folder ``out`` (``compare_agents``: cached sessions reused) and write
    ``config.json``, the summary and strata tables, with ``plots`` their charts, and with ``cfg.reference``
    the paired table.

    Args:
        cfg: the comparison.
        out: the folder (created with its parents).
        plots: write the PNG charts.
        settings: what ``run.json`` and ``config.json`` record; default ``eval_settings(cfg, plots)`` (the
            command line passes its flags, a superset).

    Raises:
        ValueError: the folder is in use or owned by another entry point (``RunFolder``).
    """
    settings = eval_settings(cfg, plots) if settings is None else settings
    with RunFolder(Path(out), OWNER, settings, same_settings=False) as folder:
        result = compare_agents(cfg, folder.path)
        # written with the tables, after every agent ran: a failed evaluation leaves the last one's
        files = [write_json(folder.path / "config.json", settings)]
        files += write_comparison(result, folder.path, plots=plots)
        table = None
        if cfg.reference is not None:
            table = paired_table(result, cfg.reference)
            files += write_paired(table, folder.path, result.level, plots=plots)
    return Evaluation(result, table, folder.path, tuple(Path(f).name for f in files))
