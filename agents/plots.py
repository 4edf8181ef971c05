"""Plots and tables from run folders: reward curves with seed bands, the Table 3 and 4 analogues, final metrics.

    python -m agents.plots runs/hepo/RUN_A runs/hepo/RUN_B ... --out runs/plots [--baseline runs/eval/BASE]

Given ``agents.hepo`` run folders (several algorithms and seeds), writes into ``--out``:

| file | what |
|---|---|
| ``curves.png`` | one panel per metric, one line per algorithm (mean over seeds) against env steps, band: the same t interval over seeds as the tables |
| ``table3.csv`` / ``.md`` | GPR Table 3 analogue: candidate quality (nDCG, OPR, mean / max / top-1 normalised value of the top-K beam) at the last evaluation, per algorithm, and the VAFT generator they all start from (their iteration-0 evaluation), with the paper's numbers alongside |
| ``final_table.csv`` / ``.md`` | per algorithm: final eval reward, GMV, CTCVR and revenue per session |
| ``table4.csv`` / ``.md`` | GPR Table 4 analogue: online CTR, CVR, CTCVR, GMV, costs (revenue) and reward per stage, the relative change of each stage vs the previous one (paired by seed) and, with ``--baseline`` (an ``agents.evaluate`` folder), vs the cascade |
| ``table5.csv`` / ``.md`` | GPR Table 5 analogue: Table 4's metrics per stage within each user-activity tier (1..5) and for new / old ads, with the cascade's strata from ``--baseline``; only when the runs' evaluations log strata (``strata_key``) |
| ``final.png`` | the final table as bars with error bars |

Runs are grouped by their ``config.json`` algorithm. Every table value is the mean over the group's runs
(seeds) with a two-sided Student t interval over seeds (``gpr_sim.stats.t_interval``; NaN with a single seed): the
per-run 95% CIs that ``metrics.jsonl`` holds measure evaluation noise of one trained policy, the seed
interval measures how much training itself varies. The VAFT row's units are the distinct starting
generators (``config.json`` ``init``), not the runs: every algorithm of a seed starts from the same one.

``plot_pretrain`` / ``pretrain_table`` do the same for ``agents.pretrain`` folders (MTP, VAFT): held-out
loss, HitRate@K and nDCG@K against steps beside the popularity baseline.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from agents.cli import run_main  # noqa: E402
from gpr_sim.runs import atomic_write_bytes, read_json, read_metrics  # noqa: E402
from gpr_sim.stats import CI_SUFFIXES, nan_estimate, relative_change, t_interval  # noqa: E402

CURVES = ("eval/reward_per_session", "eval/gmv_per_session", "eval/ctcvr", "eval/cand_mean_value")
"""the metrics drawn by default, one panel each"""
TABLE3 = ("ndcg", "opr", "mean_value", "max_value", "top1_value")
"""Table 3 columns: ``eval/cand_{name}`` of ``agents.hepo``"""
FINAL = ("reward_per_session", "gmv_per_session", "ctcvr", "revenue_per_session")
"""final-table columns: ``eval/{name}`` of ``agents.hepo``"""
PAPER_TABLE3 = {
    "MTP": {"ndcg": 0.3868, "opr": 0.5292, "mean_value": 0.2412, "max_value": 0.6201},
    "VAFT": {"ndcg": 0.3925, "opr": 0.5348},
    "+DPO": {"ndcg": 0.4383, "opr": 0.5463, "mean_value": 0.2442, "max_value": 0.6659},
    "+HEPO": {"ndcg": 0.4413, "opr": 0.5509, "mean_value": 0.2630, "max_value": 0.7619},
}
"""GPR paper, Table 3 (simulator, K = 40, normalised final_value; missing = not reported)"""
MTP_MARKER = "eval/mtp/cand_ndcg"
"""the iteration-0 key of the MTP stage's Table 3 metrics (``agents.hepo.mtp_candidates``)"""
PAPER_METRICS = ("ndcg", "opr", "mean_value", "max_value")
"""the Table 3 columns the paper reports (``top1_value`` is ours)"""
TABLE4 = ("ctr", "cvr", "ctcvr", "gmv_per_session", "revenue_per_session", "reward_per_session")
"""Table 4 columns (GPR Table 4: CTR, CVR, CTCVR, GMV, costs): ``eval/{name}``; revenue = the advertisers' cost"""
TABLE5 = TABLE4
"""Table 5 columns (GPR Table 5: online metrics per user-activity tier and for new / old ads): Table 4's"""
STRATA = {"activity_tier": ("1", "2", "3", "4", "5"), "ad_age": ("new", "old")}
"""the strata of ``gpr_sim.metrics.summarize_strata`` and their groups, in table order"""
STRATA_METRICS = {"activity_tier": TABLE5, "ad_age": tuple(m for m in TABLE5 if m != "reward_per_session")}
"""the Table 5 metrics each stratum has: ad-age groups split the ads of a session, not the session, so
they have ``AD_METRICS`` only (no reward); every group also logs ``sessions``"""
BASELINE = "cascade"
"""the ``agents.evaluate`` agent that Table 4 compares every stage with (the production-style cascade)"""
START = "VAFT"
"""stage name of the generator every algorithm starts from"""
ORDER = ("ppo", "grpo", "dpo", "hepo")
"""row order of the known algorithms (baselines first, as in GPR Table 3); others follow by name"""


# ----------------------------------------------------------------------------- reading run folders


def run_label(run: Path) -> str:
    """The run's ``label`` (e.g. hepo_no_arr), else its algorithm, else the folder name."""
    cfg = run / "config.json"
    if not cfg.is_file():
        return run.name
    meta = read_json(cfg)
    return meta.get("label") or meta.get("algo", run.name)


def check_runs(runs: list[str | Path]) -> list[Path]:
    """The folders as paths; raises ``ValueError`` naming every folder without a ``metrics.jsonl``."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("no run folders given")
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        raise ValueError(f"not run folders (no metrics.jsonl): {', '.join(missing)}")
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


def _start_key(run: Path) -> str:
    """The run's starting generator (``init``; else its seed): the unit that pairs a stage with VAFT."""
    cfg = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    return str(cfg.get("init", cfg.get("seed", run)))


def _start_units(runs: list[Path]) -> dict[str, list[dict]]:
    """Iteration-0 evaluations grouped by starting generator (``_start_key``)."""
    units: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        first = eval_rows(run)[0]
        if first.get("iteration", 0) != 0:
            raise ValueError(f"{run}/metrics.jsonl: first evaluation at iteration {first['iteration']}, expected 0")
        units[_start_key(run)].append(first)
    return dict(units)


def _final_rows(label: str, runs: list[Path]) -> list[dict]:
    rows = [eval_rows(run)[-1] for run in runs]
    its = sorted({r.get("iteration") for r in rows})
    if len(its) > 1:
        warnings.warn(f"{label}: runs end at different iterations {its}", stacklevel=3)
    return rows


def _stat_row(rows_per_unit: list[list[dict]], keys: dict[str, str], level: float) -> dict:
    """name -> mean, name_ci_low, name_ci_high over units (each unit: the mean of its rows)."""
    out: dict = {"n": len(rows_per_unit)}
    for name, key in keys.items():
        values = [np.mean([r.get(key, math.nan) for r in unit]) for unit in rows_per_unit]
        out.update(t_interval(values, level, nan_policy="propagate").columns(name))
    return out


def strata_key(stratum: str, group: str, metric: str, prefix: str = "eval/") -> str:
    """The flat ``metrics.jsonl`` key of one stratum group's metric, e.g. ``eval/strata/activity_tier/3/ctr``
    (``agents.hepo`` Evaluator: the value of ``summarize_strata``, no interval; NaN for an empty group)."""
    return f"{prefix}strata/{stratum}/{group}/{metric}"


STRATA_MARKER = strata_key("activity_tier", "1", "sessions")
"""a key every evaluation with strata holds"""


def runs_without_strata(runs: list[str | Path]) -> list[Path]:
    """The runs whose first or last evaluation has no strata keys (folders written before they were logged)."""
    missing = []
    for run in check_runs(runs):
        rows = eval_rows(run)
        if STRATA_MARKER not in rows[0] or STRATA_MARKER not in rows[-1]:
            missing.append(run)
    return missing


# ----------------------------------------------------------------------------- tables


def table3(runs: list[str | Path], level: float = 0.95) -> pd.DataFrame:
    """GPR Table 3 analogue: the MTP stage (where every run logged it), the VAFT start, then one row per
    algorithm at its last evaluation.

    Args:
        runs: ``agents.hepo`` run folders (any algorithms and seeds).
        level: coverage of the t interval over seeds.

    Returns:
        Columns ``stage`` (``MTP``, ``VAFT``, ``+HEPO``...), ``algo``, ``n`` (seeds; for MTP and VAFT:
        distinct starting generators), ``iteration`` (of the evaluation), then per metric of ``TABLE3`` the mean,
        ``_ci_low`` and ``_ci_high``; ``paper_{name}`` for ``PAPER_METRICS`` (GPR Table 3, NaN where the
        paper has no such row or value).
    """
    groups = group_runs(runs)
    keys = {name: f"eval/cand_{name}" for name in TABLE3}
    every = [run for members in groups.values() for run in members]
    units = list(_start_units(every).values())
    rows = []
    if all(MTP_MARKER in r for unit in units for r in unit):  # runs that logged their MTP stage
        mtp = _stat_row(units, {name: key.replace("eval/", "eval/mtp/", 1) for name, key in keys.items()}, level)
        rows.append({"stage": "MTP", "algo": "mtp", "iteration": 0, **mtp})
    rows.append({"stage": START, "algo": "vaft", "iteration": 0, **_stat_row(units, keys, level)})
    for algo, members in groups.items():
        final = _final_rows(algo, members)
        row = _stat_row([[r] for r in final], keys, level)
        rows.append({"stage": f"+{algo.upper()}", "algo": algo, "iteration": min(r["iteration"] for r in final),
                     **row})  # fmt: skip
    for row in rows:
        for name in PAPER_METRICS:
            row[f"paper_{name}"] = PAPER_TABLE3.get(row["stage"], {}).get(name, math.nan)
    return pd.DataFrame(rows)


def final_table(runs: list[str | Path], level: float = 0.95, start: bool = True) -> pd.DataFrame:
    """Final online metrics per algorithm: mean over seeds with a t interval over seeds.

    Args:
        runs: ``agents.hepo`` run folders.
        level: coverage of the t interval over seeds.
        start: add a first row for the VAFT generator (the iteration-0 evaluation), the common baseline.

    Returns:
        Columns ``stage``, ``algo``, ``n`` (seeds), ``iteration``, then per metric of ``FINAL`` the mean,
        ``_ci_low`` and ``_ci_high``.
    """
    groups = group_runs(runs)
    keys = {name: f"eval/{name}" for name in FINAL}
    rows = []
    if start:
        every = [run for members in groups.values() for run in members]
        start_row = _stat_row(list(_start_units(every).values()), keys, level)
        rows.append({"stage": START, "algo": "vaft", "iteration": 0, **start_row})
    for algo, members in groups.items():
        final = _final_rows(algo, members)
        rows.append({"stage": f"+{algo.upper()}", "algo": algo, "iteration": min(r["iteration"] for r in final),
                     **_stat_row([[r] for r in final], keys, level)})  # fmt: skip
    return pd.DataFrame(rows)


def read_baseline(folder: str | Path) -> tuple[dict, dict]:
    """The ``BASELINE`` row (NaN for missing values) and the config of an ``agents.evaluate`` output folder."""
    folder = Path(folder)
    for name in ("summary.json", "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not an agents.evaluate output folder (no {name})")
    rows = read_json(folder / "summary.json")
    if BASELINE not in rows:
        raise ValueError(f"{folder}/summary.json has no {BASELINE!r} row (agents: {', '.join(rows) or 'none'}): "
                         f"run agents.evaluate with --agents ...,{BASELINE}")  # fmt: skip
    row = {k: math.nan if v is None else v for k, v in rows[BASELINE].items()}
    return row, read_json(folder / "config.json")


def _check_protocol(runs: list[Path], cfg: dict, folder: Path) -> None:
    """Warn where the baseline did not run on the held-out sessions of the runs' evaluations (``agents.hepo``
    Evaluator: the env's default world, ``eval_envs`` slots, ``eval_sessions`` sessions, reset seed ``eval_seed``)."""
    have = {k: cfg[k] for k in ("env", "preset", "world_seed", "num_envs", "seed")}
    have["sessions_per_slot"] = math.ceil(cfg["sessions"] / cfg["num_envs"])
    diff = set()
    for run in runs:
        a = read_json(run / "config.json").get("args") if (run / "config.json").is_file() else None
        if a is None:
            continue
        want = {"env": a["env"], "preset": a["preset"], "world_seed": 0, "num_envs": a["eval_envs"],
                "seed": a["eval_seed"], "sessions_per_slot": math.ceil(a["eval_sessions"] / a["eval_envs"])}
        diff |= {f"{k} {have[k]} (runs: {v})" for k, v in want.items() if have[k] != v}
    if diff:
        warnings.warn(f"{folder} was not evaluated on the runs' held-out sessions: {', '.join(sorted(diff))}",
                      stacklevel=3)  # fmt: skip


def table4(runs: list[str | Path], baseline: str | Path | None = None, level: float = 0.95) -> pd.DataFrame:
    """GPR Table 4 analogue: online metrics per stage, each stage vs the previous one and vs the cascade.

    Stages as in ``table3``: VAFT (the iteration-0 evaluations), then every label's last evaluation; an RL
    stage's previous stage is VAFT (they all start from it). The change vs the previous stage is paired by
    starting generator (one per seed: the same pre-training, and every run sees the same held-out
    sessions): per run d = x_run / x_VAFT(run's generator) - 1, then mean and t interval over runs. The
    change vs the cascade is ``gpr_sim.stats.relative_change`` of the stage's per-seed values against the cascade's
    estimate and CI from ``baseline``: the seeds' spread plus the cascade's session-sampling error. The
    stage's own session-sampling error is in neither (all seeds see the same sessions); as those are the
    cascade's sessions too, it partly cancels the cascade's, which is why only the cascade's is counted.

    Args:
        runs: ``agents.hepo`` run folders (any algorithms and seeds).
        baseline: an ``agents.evaluate`` output folder with a ``cascade`` row, on the runs' held-out
            sessions (warns where its config says otherwise); None = no cascade columns.
        level: coverage of every interval.

    Returns:
        Columns ``stage``, ``algo``, ``n`` (seeds; VAFT: starting generators), ``iteration``, ``prev``
        (the previous stage, empty for VAFT), then per metric of ``TABLE4`` the mean with ``_ci_low`` /
        ``_ci_high``, ``{name}_vs_prev`` (relative change; NaN for VAFT) with its interval and, with a
        baseline, ``{name}_vs_cascade`` with its interval; a first ``cascade`` row holds the baseline's own
        values and CI over sessions (``n`` and ``iteration`` empty).
    """
    groups = group_runs(runs)
    every = [run for members in groups.values() for run in members]
    start = {u: {m: float(np.mean([r.get(f"eval/{m}", math.nan) for r in rows])) for m in TABLE4}
             for u, rows in _start_units(every).items()}  # fmt: skip
    stages = [(START, "vaft", 0, "", list(start.values()), None)]
    for algo, members in groups.items():
        final = _final_rows(algo, members)
        values = [{m: r.get(f"eval/{m}", math.nan) for m in TABLE4} for r in final]
        stages.append((f"+{algo.upper()}", algo, min(r["iteration"] for r in final), START, values,
                       [start[_start_key(run)] for run in members]))  # fmt: skip
    ref = None
    rows = []
    if baseline is not None:
        ref, cfg = read_baseline(baseline)
        _check_protocol(every, cfg, Path(baseline))
        own = {f"{m}{s}": ref[f"eval/{m}{s}"] for m in TABLE4 for s in CI_SUFFIXES}
        rows.append({"stage": BASELINE, "algo": BASELINE, "n": None, "iteration": None, "prev": "", **own})
    for stage, algo, iteration, prev, values, prev_values in stages:
        row = {"stage": stage, "algo": algo, "n": len(values), "iteration": iteration, "prev": prev}
        for m in TABLE4:
            x = np.array([v[m] for v in values], dtype=np.float64)
            row.update(t_interval(x, level, nan_policy="propagate").columns(m))
            d = (x / np.array([p[m] for p in prev_values]) - 1) if prev_values else None
            vs = t_interval(d, level, nan_policy="propagate") if d is not None else nan_estimate()
            row.update(vs.columns(f"{m}_vs_prev"))
            if ref is not None:
                k = f"eval/{m}"
                vs = relative_change(x, ref[k], ref[f"{k}_ci_low"], ref[f"{k}_ci_high"], ref_level=cfg["level"],
                                     level=level, nan_policy="propagate")  # fmt: skip
                row.update(vs.columns(f"{m}_vs_{BASELINE}"))
        rows.append(row)
    return pd.DataFrame(rows).astype({"n": "Int64", "iteration": "Int64"})


def estimate_cell(r, m: str, fmt: str = ".4g") -> str:
    """``mean [low, high]`` of metric ``m`` of row ``r`` (``fmt``: 4 significant digits); the mean alone
    without an interval; n/a without a value."""
    v, lo, hi = (r[f"{m}{s}"] for s in CI_SUFFIXES)
    if not np.isfinite(v):
        return "n/a"
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) else f"{v:{fmt}}"


def change_cell(r, key: str, fmt: str = "+.2%", missing: str = "") -> str:
    """``+x% [low, high]`` of the relative change ``key`` of row ``r``; ``missing`` without a value."""
    v, lo, hi = (r.get(f"{key}{s}", math.nan) for s in CI_SUFFIXES)
    if not np.isfinite(v):
        return missing
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) else f"{v:{fmt}}"


def table4_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """Three tables: the metrics, the relative change vs the previous stage, and (with a baseline) vs the cascade."""
    head = "| stage | n | " + " | ".join(TABLE4) + " |\n|" + "---|" * (len(TABLE4) + 2) + "\n"

    def lines(part, cell):
        return "".join(f"| {r['stage']} | {'' if pd.isna(r['n']) else r['n']} | "
                       + " | ".join(cell(r, m) for m in TABLE4) + " |\n" for _, r in part.iterrows())  # fmt: skip

    stages = table[table["stage"] != BASELINE]
    out = (f"online metrics (revenue_per_session = the advertisers' cost): mean over seeds [{level:.0%} t interval "
           f"over seeds; none with one seed]" + (f"; {BASELINE}: agents.evaluate, CI over its sessions"
                                                  if (table["stage"] == BASELINE).any() else "")
           + "\n\n" + head + lines(table, estimate_cell))  # fmt: skip
    out += (f"\nrelative change vs the previous stage ({START} for every RL stage), paired by seed: mean of "
            f"x / x_prev - 1 [{level:.0%} t interval over seeds]\n\n" + head
            + lines(stages[stages["prev"] != ""], lambda r, m: change_cell(r, f"{m}_vs_prev")))  # fmt: skip
    if f"{TABLE4[0]}_vs_{BASELINE}" in table:
        out += (f"\nrelative change vs {BASELINE}: mean(x) / {BASELINE} - 1 [{level:.0%} interval: seed spread "
                f"and the {BASELINE}'s CI, delta method, Welch-Satterthwaite df]\n\n" + head
                + lines(stages, lambda r, m: change_cell(r, f"{m}_vs_{BASELINE}")))  # fmt: skip
    return out


def read_baseline_strata(folder: str | Path) -> dict[tuple[str, str], dict]:
    """(stratum, group) -> the ``BASELINE`` agent's row of an ``agents.evaluate`` folder's ``strata.csv``."""
    path = Path(folder) / "strata.csv"
    if not path.is_file():
        raise ValueError(f"{folder} has no strata.csv: not an agents.evaluate output folder with strata")
    table = pd.read_csv(path, dtype={"group": str})
    part = table[table["agent"] == BASELINE]
    if part.empty:
        agents = ", ".join(dict.fromkeys(table["agent"])) or "none"
        raise ValueError(f"{path} has no {BASELINE!r} rows (agents: {agents})")
    return {(r["stratum"], r["group"]): r for r in part.to_dict("records")}


def table5(runs: list[str | Path], baseline: str | Path | None = None, level: float = 0.95) -> pd.DataFrame:
    """GPR Table 5 analogue: Table 4's online metrics per stage within each stratum group.

    Stages as in ``table4`` (VAFT: the iteration-0 evaluations, one unit per starting generator; then every
    label's last evaluation); strata as in ``gpr_sim.metrics.summarize_strata``: user activity tiers 1..5
    (sessions split by their user's tier) and new / old ads (each session's ads split by age; no reward).
    Each value is the mean over seeds of the runs' per-group evaluation values (``strata_key``) with a t
    interval over seeds, as in ``final_table``; an empty group in one run (NaN) makes the stage's value NaN.

    Args:
        runs: ``agents.hepo`` run folders whose evaluations log strata (raises ``ValueError`` naming those
            that do not: folders written before the Evaluator logged them).
        baseline: an ``agents.evaluate`` output folder (``summary.json`` with a cascade row, ``strata.csv``);
            None = no cascade rows.
        level: coverage of the t interval over seeds.

    Returns:
        One row per (stratum, group, stage), in ``STRATA`` order then stage order: ``stratum``, ``group``,
        ``stage``, ``algo``, ``n`` (seeds; VAFT: starting generators), ``iteration``, ``sessions`` (mean
        held-out sessions in the group; an ad-age group counts every session), then per metric of
        ``TABLE5`` the mean, ``_ci_low`` and ``_ci_high`` (NaN where the stratum has no such metric:
        ``STRATA_METRICS``). With a baseline each group starts with a ``cascade`` row: its value and CI
        over sessions (``n`` and ``iteration`` empty).
    """
    groups = group_runs(runs)
    every = [run for members in groups.values() for run in members]
    missing = runs_without_strata(every)
    if missing:
        raise ValueError(f"no per-stratum evaluations ({STRATA_MARKER!r} ...) in the metrics.jsonl of: "
                         f"{', '.join(map(str, missing))}: run folders from before agents.hepo logged them")  # fmt: skip
    stages = [(START, "vaft", 0, list(_start_units(every).values()))]
    for algo, members in groups.items():
        final = _final_rows(algo, members)
        stages.append((f"+{algo.upper()}", algo, min(r["iteration"] for r in final), [[r] for r in final]))
    ref = None
    if baseline is not None:
        _, cfg = read_baseline(baseline)
        _check_protocol(every, cfg, Path(baseline))
        ref = read_baseline_strata(baseline)
    rows = []
    for stratum, names in STRATA.items():
        metrics = STRATA_METRICS[stratum]
        for group in names:
            where = {"stratum": stratum, "group": group}
            if ref is not None:
                r = ref.get((stratum, group), {})
                own = {f"{m}{s}": r.get(f"eval/{m}{s}", math.nan) for m in metrics for s in CI_SUFFIXES}
                rows.append({**where, "stage": BASELINE, "algo": BASELINE, "n": None, "iteration": None,
                             "sessions": r.get("eval/sessions", math.nan), **own})  # fmt: skip
            keys = {m: strata_key(stratum, group, m) for m in metrics}
            for stage, algo, iteration, units in stages:
                stat = _stat_row(units, {"sessions": strata_key(stratum, group, "sessions"), **keys}, level)
                rows.append({**where, "stage": stage, "algo": algo, "iteration": iteration,
                             **{k: v for k, v in stat.items() if not k.startswith("sessions_")}})  # fmt: skip
    columns = ["stratum", "group", "stage", "algo", "n", "iteration", "sessions"]
    columns += [f"{m}{s}" for m in TABLE5 for s in CI_SUFFIXES]
    return pd.DataFrame(rows, columns=columns).astype({"n": "Int64", "iteration": "Int64"})


def table5_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """One table per stratum: a row per (group, stage), ``mean [low, high]`` per metric the stratum has."""
    cascade = (table["stage"] == BASELINE).any()
    out = (f"online metrics by stratum (revenue_per_session = the advertisers' cost): mean over seeds "
           f"[{level:.0%} t interval over seeds; none with one seed]"
           + (f"; {BASELINE}: agents.evaluate, CI over its sessions" if cascade else "")
           + "; sessions: held-out sessions in the group (mean over seeds; an ad-age group counts every "
           "session, its metrics count only the ads of that age)\n")  # fmt: skip
    titles = {"activity_tier": "user activity tier (1 = least active)", "ad_age": "ad age (new / old ads)"}
    for stratum in dict.fromkeys(table["stratum"]):
        part, metrics = table[table["stratum"] == stratum], STRATA_METRICS.get(stratum, TABLE5)
        out += (f"\n{titles.get(stratum, stratum)}\n\n| {stratum} | stage | n | sessions | " + " | ".join(metrics)
                + " |\n|" + "---|" * (len(metrics) + 4) + "\n")  # fmt: skip
        for _, r in part.iterrows():
            sessions = f"{r['sessions']:.4g}" if np.isfinite(r["sessions"]) else "n/a"
            out += (f"| {r['group']} | {r['stage']} | {'' if pd.isna(r['n']) else r['n']} | {sessions} | "
                    + " | ".join(estimate_cell(r, m) for m in metrics) + " |\n")  # fmt: skip
    return out


def to_markdown(table: pd.DataFrame, metrics: tuple[str, ...], level: float = 0.95) -> str:
    """``mean [low, high]`` per metric (and the paper's value where the table has ``paper_`` columns)."""
    head = ["stage", "n", *metrics]
    paper = [m for m in metrics if f"paper_{m}" in table]
    head += [f"paper {m}" for m in paper]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["stage"]), str(int(r["n"]))]
        cells += [estimate_cell(r, m, ".4f") for m in metrics]
        cells += [f"{r[f'paper_{m}']:.4f}" if np.isfinite(r[f"paper_{m}"]) else "" for m in paper]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\nmean over seeds [{level:.0%} Student t interval over seeds; none with one seed]\n"
    return "\n".join(lines) + "\n" + note


# ----------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _series(run: Path, metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get(metric) is not None]
    xs = np.array([r.get(x, r.get("iteration", 0)) for r in rows], dtype=float)
    ys = np.array([r[metric] for r in rows], dtype=float)
    lo = f"{metric}_ci_low"
    band = np.array([[r[lo], r[f"{metric}_ci_high"]] for r in rows], dtype=float) if rows and lo in rows[0] else None
    return xs, ys, band


def seed_curves(
    runs: list[Path], metric: str, x: str = "env_steps", level: float = 0.95
) -> dict[str, dict[str, np.ndarray | int]]:
    """label -> the curve ``plot_curves`` draws for ``metric``: ``x``, ``mean``, ``low``, ``high`` ((T,) each,
    over the first T evaluations every run of the label has) and ``n`` (runs).

    With several runs the band is the Student t interval over seeds at each evaluation, the same
    ``t_interval`` as every table here (at the last evaluation it is the final table's interval); a single
    run's band is its own CI columns (evaluation noise over sessions) when it has them, else NaN.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        groups[run_label(Path(run))].append(Path(run))
    curves = {}
    for label, members in sorted(groups.items()):
        series = [s for s in (_series(r, metric, x) for r in members) if s[0].size]
        if not series:
            continue
        n = min(s[0].size for s in series)
        ys = np.stack([s[1][:n] for s in series])  # (runs, T)
        if len(series) > 1:
            est = [t_interval(ys[:, j], level, nan_policy="propagate") for j in range(n)]
            low, high = np.array([e.ci_low for e in est]), np.array([e.ci_high for e in est])
        elif series[0][2] is not None:
            low, high = series[0][2][:n, 0], series[0][2][:n, 1]
        else:
            low = high = np.full(n, np.nan)
        curves[label] = {"x": series[0][0][:n], "mean": ys.mean(0), "low": low, "high": high, "n": len(series)}
    return curves


def plot_curves(
    runs: list[Path], path: Path, metrics: tuple[str, ...] = CURVES, x: str = "env_steps", level: float = 0.95
) -> Path:
    """One panel per metric, one line per algorithm (mean over its runs), seed band; saved to ``path``.

    The band is the ``level`` Student t interval over seeds (``seed_curves``), the interval the tables
    report; a single run shows its own CI columns (over sessions) when it has them. The legend says which.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, c in seed_curves(runs, metric, x, level).items():
            line = ax.plot(c["x"], c["mean"], marker="o", ms=3, label=f"{label} (n={c['n']})")[0]
            ax.fill_between(c["x"], c["low"], c["high"], color=line.get_color(), alpha=0.2)
        ax.set_title(metric.split("/", 1)[-1])
        ax.set_xlabel(x.replace("_", " "))
        ax.grid(alpha=0.3)
    handles, _ = axes[0][0].get_legend_handles_labels()
    band = Patch(color="gray", alpha=0.2, label=f"band: {level:.0%} t interval over seeds (n=1: the run's own CI)")
    axes[0][0].legend(handles=[*handles, band], fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_table(table: pd.DataFrame, path: Path, metrics: tuple[str, ...] = FINAL, level: float = 0.95) -> Path:
    """Bars of a ``final_table`` / ``table3`` frame, one panel per metric, t-interval error bars."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    x = np.arange(len(table))
    colors = ["tab:gray" if s == START else f"C{i}" for i, s in enumerate(table["stage"])]
    for ax, name in zip(axes[0], metrics):
        v = table[name].to_numpy(float)
        err = np.stack([v - table[f"{name}_ci_low"].to_numpy(float), table[f"{name}_ci_high"].to_numpy(float) - v])
        ax.bar(x, np.nan_to_num(v), yerr=np.nan_to_num(err), capsize=3, color=colors)
        for i in np.flatnonzero(~np.isfinite(v)):
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        if f"paper_{name}" in table:
            ax.scatter(x, table[f"paper_{name}"], marker="*", s=60, color="black", zorder=3, label="paper")
            ax.legend(fontsize=7)
        ax.set_xticks(x, table["stage"], rotation=30, ha="right")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"last evaluation: mean over seeds, {level:.0%} t interval over seeds", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- pre-training runs


def _pretrain_k(run: Path) -> int:
    return int(read_json(run / "config.json").get("top_k", 10))


def _step_offsets(runs: list[Path]) -> dict[Path, int]:
    """Steps to add to each run's x axis: a run started from another listed run's checkpoint continues it."""
    by_dir = {r.resolve(): r for r in runs}
    offsets: dict[Path, int] = {}

    def offset(run: Path) -> int:
        if run not in offsets:
            offsets[run] = 0  # guards a cycle
            init = read_json(run / "config.json").get("init") or ""
            parent = by_dir.get(Path(init).resolve().parent) if init else None
            if parent is not None and parent != run:
                offsets[run] = offset(parent) + int(read_metrics(parent / "metrics.jsonl")[-1]["step"])
        return offsets[run]

    for run in runs:
        offset(run)
    return offsets


def pretrain_table(runs: list[str | Path]) -> pd.DataFrame:
    """One row per ``agents.pretrain`` run: stage, steps, first and last held-out metrics, popularity."""
    rows = []
    for run in check_runs(runs):
        cfg, metrics = read_json(run / "config.json"), read_metrics(run / "metrics.jsonl")
        k = _pretrain_k(run)
        first, last = metrics[0], metrics[-1]
        rows.append({"run": run.name, "stage": cfg.get("stage", run.name), "steps": last["step"],
                     "eval_loss_start": first["eval/loss"], "eval_loss_end": last["eval/loss"],
                     f"hitrate@{k}_start": first[f"eval/hitrate@{k}"], f"hitrate@{k}_end": last[f"eval/hitrate@{k}"],
                     f"pop_hitrate@{k}": last[f"eval/pop_hitrate@{k}"],
                     f"ndcg@{k}_start": first[f"eval/ndcg@{k}"], f"ndcg@{k}_end": last[f"eval/ndcg@{k}"],
                     f"pop_ndcg@{k}": last[f"eval/pop_ndcg@{k}"]})  # fmt: skip
    return pd.DataFrame(rows)


def plot_pretrain(runs: list[str | Path], path: Path) -> Path:
    """Held-out loss, HitRate@K and nDCG@K against steps, one line per run (a VAFT run continues the
    MTP run it started from on the x axis), popularity baseline dashed; saved to ``path``."""
    runs = check_runs(runs)
    offsets = _step_offsets(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        k, rows = _pretrain_k(run), read_metrics(run / "metrics.jsonl")
        label = read_json(run / "config.json").get("stage", run.name)
        steps = np.array([r["step"] for r in rows], dtype=float) + offsets[run]
        line = axes[0].plot(steps, [r["eval/loss"] for r in rows], marker="o", ms=3, label=f"{label} held-out")[0]
        train = [(s, r["train/loss_mtp"]) for s, r in zip(steps, rows) if "train/loss_mtp" in r]
        if train:
            axes[0].plot(*zip(*train), ls=":", color=line.get_color(), label=f"{label} train (MTP term)")
        for ax, name in zip(axes[1:], (f"hitrate@{k}", f"ndcg@{k}")):
            ax.plot(steps, [r[f"eval/{name}"] for r in rows], marker="o", ms=3, color=line.get_color(), label=label)
            ax.plot(steps, [r[f"eval/pop_{name}"] for r in rows], ls="--", color="gray",
                    label="popularity" if run == runs[0] else None)  # fmt: skip
            ax.set_title(f"held-out {name}")
    axes[0].set_title("loss (each stage's own target weights)")
    for ax in axes:
        ax.set_xlabel("optimiser steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- main


def write_report(
    runs: list[str | Path], out: str | Path, level: float = 0.95, baseline: str | Path | None = None
) -> dict[str, Path]:
    """Every file of the module docstring into ``out`` (``baseline``: see ``table4``); returns name -> path.

    ``table5`` only when every run logs strata; when only some do, it is left out with a warning."""
    runs, out = check_runs(runs), Path(out)
    t3, fin, t4 = table3(runs, level), final_table(runs, level), table4(runs, baseline, level)
    files = {"curves": plot_curves(runs, out / "curves.png", level=level)}
    for name, table, markdown in (("table3", t3, to_markdown(t3, TABLE3, level)),
                                  ("final_table", fin, to_markdown(fin, FINAL, level)),
                                  ("table4", t4, table4_markdown(t4, level))):  # fmt: skip
        files[f"{name}.csv"] = atomic_write_bytes(out / f"{name}.csv", table.to_csv(index=False).encode())
        files[f"{name}.md"] = atomic_write_bytes(out / f"{name}.md", markdown.encode())
    missing = runs_without_strata(runs)
    if not missing:
        t5 = table5(runs, baseline, level)
        files["table5.csv"] = atomic_write_bytes(out / "table5.csv", t5.to_csv(index=False).encode())
        files["table5.md"] = atomic_write_bytes(out / "table5.md", table5_markdown(t5, level).encode())
    elif len(missing) < len(runs):
        warnings.warn(f"table5 not written: no per-stratum evaluations in {', '.join(map(str, missing))} "
                      "(run folders from before agents.hepo logged them)", stacklevel=2)  # fmt: skip
    files["final"] = plot_table(fin, out / "final.png", FINAL, level)
    return files


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (agents.hepo output)")
    parser.add_argument("--out", default="runs/plots", help="output folder")
    parser.add_argument("--level", type=float, default=0.95, help="coverage of the t intervals over seeds")
    parser.add_argument("--baseline", default=None, help="agents.evaluate folder with a cascade row (Tables 4, 5)")
    ns = parser.parse_args(argv)
    try:
        files = write_report(ns.runs, ns.out, ns.level, ns.baseline)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    for name in ("table3.md", "final_table.md", "table4.md", "table5.md"):
        if name in files:
            print(files[name].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return files


if __name__ == "__main__":
    run_main(main)
