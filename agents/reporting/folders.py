"""Reading run folders back for the reports: ``agents.hepo`` runs (grouped by label, their evaluations),
``agents.evaluate`` folders (the ``cascade-privileged`` baseline) and ``agents.pretrain`` runs.

Every check here raises ``ValueError`` naming the folder and what it lacks, before any table is built. Runs
whose markets' auctions rank on different models (``agents.hepo --auction``: ``run_auction``) are never
put in one table or figure: ``check_runs`` refuses them, naming each group.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import pandas as pd

from agents.reporting.keys import (
    BASELINE,
    BASELINE_NAMES,
    BEST_ITERATION,
    BEST_METRIC,
    GRADIENT_COLUMNS,
    GRADIENTS,
    ORDER,
    POLICIES,
    STRATA_MARKER,
)
from gpr_sim.runs import read_json, read_metrics


def run_label(run: Path) -> str:
    """The run's ``label`` (e.g. hepo_no_arr), else its algorithm, else the folder name."""
    cfg = run / "config.json"
    if not cfg.is_file():
        return run.name
    meta = read_json(cfg)
    return meta.get("label") or meta.get("algo", run.name)


def run_auction(run: Path) -> str:
    """What the run's markets' auction ranked on (``agents.hepo``'s ``config.json`` ``auction``): "privileged"
    (also for folders written before the setting existed, which all ran it) or "learned"."""
    cfg = run / "config.json"
    meta = read_json(cfg) if cfg.is_file() else {}
    auction = meta.get("auction")
    return auction.get("estimator", "privileged") if isinstance(auction, dict) else "privileged"


def check_runs(runs: list[str | Path]) -> list[Path]:
    """The folders as paths; raises ``ValueError`` naming every folder without a ``metrics.jsonl``, and the runs
    of each auction when they ran under different ones (``run_auction``: their numbers are not comparable)."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("no run folders given")
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        raise ValueError(f"not run folders (no metrics.jsonl): {', '.join(missing)}")
    auctions: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        auctions[run_auction(run)].append(str(run))
    if len(auctions) > 1:
        groups = "; ".join(f"{a}: {', '.join(rs)}" for a, rs in sorted(auctions.items()))
        raise ValueError(f"runs of different auctions are not comparable ({groups}): report them apart")
    return runs


def eval_rows(run: Path, key: str = "eval/reward_per_session") -> list[dict]:
    """The run's ``metrics.jsonl`` rows that hold ``key`` (its evaluations), in order; raises if none."""
    rows = [r for r in read_metrics(run / "metrics.jsonl") if key in r]
    if not rows:
        raise ValueError(f"{run}/metrics.jsonl has no evaluation rows (no {key!r})")
    return rows


def group_runs(runs: list[str | Path]) -> dict[str, list[Path]]:
    """algorithm -> its runs (seeds), in ``ORDER`` then by name."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in check_runs(runs):
        groups[run_label(run)].append(run)
    rank = {a: i for i, a in enumerate(ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def start_key(run: Path) -> str:
    """The run's starting generator (``init``; else its seed): the unit that pairs a stage with VAFT."""
    cfg = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    return str(cfg.get("init", cfg.get("seed", run)))


def start_units(runs: list[Path]) -> dict[str, list[dict]]:
    """Iteration-0 evaluations grouped by starting generator (``start_key``)."""
    units: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        first = eval_rows(run)[0]
        if first.get("iteration", 0) != 0:
            raise ValueError(
                f"{run}/metrics.jsonl: first evaluation at iteration {first['iteration']}, expected 0"
            )
        units[start_key(run)].append(first)
    return dict(units)


def best_row(run: Path) -> dict:
    """The evaluation ``agents.hepo`` chose the run's best policy at (``OUT/best``), read back from
    ``metrics.jsonl`` (so a run stopped before its ``summary.json`` has one too): the one the last evaluation's
    ``BEST_ITERATION`` names, or, in folders from before it was logged, the highest finite ``BEST_METRIC`` (the
    earliest on ties: what ``agents.hepo`` chose then); raises when no evaluation has a finite value."""
    rows = [r for r in eval_rows(run) if math.isfinite(r.get(BEST_METRIC, math.nan))]
    if not rows:
        raise ValueError(f"{run}/metrics.jsonl: no evaluation with a finite {BEST_METRIC!r}: no best policy")
    if BEST_ITERATION in rows[-1]:
        chosen = [r for r in rows if r["iteration"] == rows[-1][BEST_ITERATION]]
        if not chosen:
            raise ValueError(
                f"{run}/metrics.jsonl: {BEST_ITERATION} {rows[-1][BEST_ITERATION]} names no evaluation of the run"
            )
        return chosen[0]
    return max(rows, key=lambda r: r[BEST_METRIC])  # max keeps the first of equal values


def update_gradients(run: Path) -> dict[str, float]:
    """The run's update gradients (``GRADIENTS`` without ``train/``): each the mean over the iterations that stepped
    the policy (a policy gradient; the critic warm-up's are left out); NaN each for a run from before they were
    logged."""
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get(GRADIENTS[0], 0) > 0]
    return {
        column: (sum(r[key] for r in rows) / len(rows) if rows else math.nan)
        for column, key in zip(GRADIENT_COLUMNS, GRADIENTS)
    }


def final_rows(label: str, runs: list[Path], policy: str = "last") -> list[dict]:
    """The evaluation of every run of ``label`` that the tables report: its last (``policy="last"``; warns when
    the runs end at different iterations) or the one its best policy was chosen at (``"best"``, ``best_row``)."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: expected one of {', '.join(POLICIES)}")
    if policy == "best":
        return [best_row(run) for run in runs]
    rows = [eval_rows(run)[-1] for run in runs]
    its = sorted({r.get("iteration") for r in rows})
    if len(its) > 1:
        warnings.warn(f"{label}: runs end at different iterations {its}", stacklevel=3)
    return rows


def runs_without_strata(runs: list[str | Path]) -> list[Path]:
    """The runs whose first or last evaluation has no strata keys (folders written before they were logged)."""
    missing = []
    for run in check_runs(runs):
        rows = eval_rows(run)
        if STRATA_MARKER not in rows[0] or STRATA_MARKER not in rows[-1]:
            missing.append(run)
    return missing


def baseline_name(agents) -> str | None:
    """The first of ``BASELINE_NAMES`` among ``agents`` (an older folder names the baseline ``cascade``)."""
    return next((name for name in BASELINE_NAMES if name in agents), None)


def read_baseline(folder: str | Path) -> tuple[dict, dict]:
    """The ``BASELINE`` row (NaN for missing values) and the config of an ``agents.evaluate`` output folder."""
    folder = Path(folder)
    for name in ("summary.json", "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not an agents.evaluate output folder (no {name})")
    rows = read_json(folder / "summary.json")
    name = baseline_name(rows)
    if name is None:
        raise ValueError(
            f"{folder}/summary.json has no {BASELINE!r} row (agents: {', '.join(rows) or 'none'}): "
            f"run agents.evaluate with --agents ...,{BASELINE}"
        )
    row = {k: math.nan if v is None else v for k, v in rows[name].items()}
    return row, read_json(folder / "config.json")


def read_baseline_strata(folder: str | Path) -> dict[tuple[str, str], dict]:
    """(stratum, group) -> the ``BASELINE`` agent's row of an ``agents.evaluate`` folder's ``strata.csv``."""
    path = Path(folder) / "strata.csv"
    if not path.is_file():
        raise ValueError(f"{folder} has no strata.csv: not an agents.evaluate output folder with strata")
    table = pd.read_csv(path, dtype={"group": str})
    part = table[table["agent"] == baseline_name(set(table["agent"]))]
    if part.empty:
        agents = ", ".join(dict.fromkeys(table["agent"])) or "none"
        raise ValueError(f"{path} has no {BASELINE!r} rows (agents: {agents})")
    return {(r["stratum"], r["group"]): r for r in part.to_dict("records")}


def check_protocol(runs: list[Path], cfg: dict, folder: Path) -> None:
    """Warn where the baseline did not run on the held-out sessions of the runs' evaluations (``agents.hepo``'s
    held-out Evaluator: the env's default world, ``eval_envs`` slots, ``eval_sessions`` sessions, reset seed
    ``eval_seed``, the auction: ``agents.evaluate --auction`` for runs with ``--auction``)."""
    have = {k: cfg[k] for k in ("env", "preset", "world_seed", "num_envs", "seed")}
    have["sessions_per_slot"] = math.ceil(cfg["sessions"] / cfg["num_envs"])
    have["auction"] = "learned" if cfg.get("auction") else "privileged"
    diff = set()
    for run in runs:
        a = read_json(run / "config.json").get("args") if (run / "config.json").is_file() else None
        if a is None:
            continue
        want = {
            "env": a["env"],
            "preset": a["preset"],
            "world_seed": 0,
            "num_envs": a["eval_envs"],
            "seed": a["eval_seed"],
            "sessions_per_slot": math.ceil(a["eval_sessions"] / a["eval_envs"]),
            "auction": run_auction(run),
        }
        diff |= {f"{k} {have[k]} (runs: {v})" for k, v in want.items() if have[k] != v}
    if diff:
        warnings.warn(
            f"{folder} was not evaluated on the runs' held-out sessions: {', '.join(sorted(diff))}",
            stacklevel=3,
        )


def pretrain_top_k(run: Path) -> int:
    """The K of an ``agents.pretrain`` run's HitRate@K / nDCG@K (``config.json`` ``top_k``; 10 by default)."""
    return int(read_json(run / "config.json").get("top_k", 10))
