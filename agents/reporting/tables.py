"""The report's tables from run folders: GPR Table 3, 4 and 5 analogues, the final table, pre-training runs.

Every value of a stage is the mean over the group's runs (seeds) with a two-sided Student t interval over
seeds (``gpr_sim.stats.t_interval``; NaN with a single seed): the per-run 95% CIs that ``metrics.jsonl``
holds measure evaluation noise of one trained policy, the seed interval measures how much training itself
varies. The VAFT row's units are the distinct starting generators (``config.json`` ``init``), not the runs:
every algorithm of a seed starts from the same one. The markdown functions write them as
``mean [low, high]`` cells; the keys they read are ``agents.reporting.keys``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from agents.reporting.folders import (
    check_protocol,
    check_runs,
    final_rows,
    group_runs,
    pretrain_top_k,
    read_baseline,
    read_baseline_strata,
    runs_without_strata,
    start_key,
    start_units,
)
from agents.reporting.keys import (
    BASELINE,
    BASELINE_NOTE,
    FINAL,
    MTP_MARKER,
    PAPER_METRICS,
    PAPER_TABLE3,
    START,
    STRATA,
    STRATA_MARKER,
    STRATA_METRICS,
    TABLE3,
    TABLE4,
    TABLE5,
    strata_key,
)
from gpr_sim.runs import read_json, read_metrics
from gpr_sim.stats import CI_SUFFIXES, nan_estimate, relative_change, t_interval


def _stat_row(rows_per_unit: list[list[dict]], keys: dict[str, str], level: float) -> dict:
    """name -> mean, name_ci_low, name_ci_high over units (each unit: the mean of its rows)."""
    out: dict = {"n": len(rows_per_unit)}
    for name, key in keys.items():
        values = [np.mean([r.get(key, math.nan) for r in unit]) for unit in rows_per_unit]
        out.update(t_interval(values, level, nan_policy="propagate").columns(name))
    return out


def table3(runs: list[str | Path], level: float = 0.95, policy: str = "last") -> pd.DataFrame:
    """GPR Table 3 analogue: the MTP stage (of the generators whose runs logged it), the VAFT start, then one row
    per algorithm at its last evaluation (``policy="best"``: at its best policy's).

    The candidate metrics are computed on fixed held-out states (the same for every evaluation of a run), so a
    stage and the VAFT generator it started from are paired: ``{name}_vs_vaft`` is the mean over units of the
    difference to that generator's VAFT value (MTP: one unit per generator, MTP minus its VAFT; an RL stage: one
    per run, its evaluation minus its generator's iteration 0) with a t interval over those units: the
    ordering MTP < VAFT < RL as each seed shows it, without the spread between generators.

    Args:
        runs: ``agents.hepo`` run folders (any algorithms and seeds).
        level: coverage of the t interval over seeds.
        policy: each run's evaluation to report: "last", or "best" (where its best policy was chosen,
            ``agents.reporting.folders.best_row``).

    Returns:
        Columns ``stage`` (``MTP``, ``VAFT``, ``+HEPO``...), ``algo``, ``n`` (seeds; for MTP and VAFT:
        distinct starting generators, for MTP those with an MTP stage logged), ``iteration`` (of the
        evaluation), then per metric of ``TABLE3`` the mean, ``_ci_low`` and ``_ci_high``, the same three for
        ``{name}_vs_vaft`` (NaN on the VAFT row); ``paper_{name}`` for ``PAPER_METRICS`` (GPR Table 3, NaN
        where the paper has no such row or value).
    """
    groups = group_runs(runs)
    keys = {name: f"eval/cand_{name}" for name in TABLE3}
    mtp_keys = {name: key.replace("eval/", "eval/mtp/", 1) for name, key in keys.items()}
    every = [run for members in groups.values() for run in members]
    units = start_units(every)
    vaft = {
        u: {name: float(np.mean([r.get(k, math.nan) for r in rows])) for name, k in keys.items()}
        for u, rows in units.items()
    }

    def paired(values: list[dict[str, float]], starts: list[str]) -> dict:
        out = {}
        for name in TABLE3:
            d = [v[name] - vaft[u][name] for v, u in zip(values, starts)]
            out.update(t_interval(d, level, nan_policy="propagate").columns(f"{name}_vs_vaft"))
        return out

    rows = []
    # the MTP stage of every generator some run logged it for (one MTP checkpoint per generator: any of its
    # runs' rows gives the same values); a run folder without it (e.g. a start from a bundle that carried
    # the VAFT weights only) leaves its generator out, and ``n`` says how many are in
    mtp_units = {u: [r for r in unit if MTP_MARKER in r] for u, unit in units.items()}
    mtp_units = {u: unit for u, unit in mtp_units.items() if unit}
    if mtp_units:
        mtp = _stat_row(list(mtp_units.values()), mtp_keys, level)
        per_unit = [
            {name: float(np.mean([r[k] for r in unit])) for name, k in mtp_keys.items()}
            for unit in mtp_units.values()
        ]
        mtp.update(paired(per_unit, list(mtp_units)))
        rows.append({"stage": "MTP", "algo": "mtp", "iteration": 0, **mtp})
    start = _stat_row(list(units.values()), keys, level)
    start.update({f"{name}_vs_vaft{s}": math.nan for name in TABLE3 for s in CI_SUFFIXES})
    rows.append({"stage": START, "algo": "vaft", "iteration": 0, **start})
    for algo, members in groups.items():
        final = final_rows(algo, members, policy)
        row = _stat_row([[r] for r in final], keys, level)
        row.update(
            paired(
                [{name: r.get(k, math.nan) for name, k in keys.items()} for r in final],
                [start_key(run) for run in members],
            )
        )
        rows.append(
            {
                "stage": f"+{algo.upper()}",
                "algo": algo,
                "iteration": min(r["iteration"] for r in final),
                **row,
            }
        )
    for row in rows:
        for name in PAPER_METRICS:
            row[f"paper_{name}"] = PAPER_TABLE3.get(row["stage"], {}).get(name, math.nan)
    return pd.DataFrame(rows)


def table3_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """``to_markdown`` of the stages, then each stage minus the VAFT generator it started from (paired)."""
    head = "| stage | n | " + " | ".join(TABLE3) + " |\n|" + "---|" * (len(TABLE3) + 2) + "\n"
    stages = table[table["stage"] != START]
    return (
        to_markdown(table, TABLE3, level)
        + f"\nminus {START}, paired by starting generator (MTP: per generator; an RL stage: per run): mean of the "
        f"differences [{level:.0%} t interval over them]\n\n"
        + head
        + "".join(
            f"| {r['stage']} | {int(r['n'])} | "
            + " | ".join(change_cell(r, f"{m}_vs_vaft", "+.4f", "n/a") for m in TABLE3)
            + " |\n"
            for _, r in stages.iterrows()
        )
    )


def final_table(
    runs: list[str | Path], level: float = 0.95, start: bool = True, policy: str = "last"
) -> pd.DataFrame:
    """Final online metrics per algorithm: mean over seeds with a t interval over seeds.

    Args:
        runs: ``agents.hepo`` run folders.
        level: coverage of the t interval over seeds.
        start: add a first row for the VAFT generator (the iteration-0 evaluation), the common baseline.
        policy: each run's evaluation to report: "last", or "best" (where its best policy was chosen,
            ``agents.reporting.folders.best_row``).

    Returns:
        Columns ``stage``, ``algo``, ``n`` (seeds), ``iteration``, then per metric of ``FINAL`` the mean,
        ``_ci_low`` and ``_ci_high``.
    """
    groups = group_runs(runs)
    keys = {name: f"eval/{name}" for name in FINAL}
    rows = []
    if start:
        every = [run for members in groups.values() for run in members]
        start_row = _stat_row(list(start_units(every).values()), keys, level)
        rows.append({"stage": START, "algo": "vaft", "iteration": 0, **start_row})
    for algo, members in groups.items():
        final = final_rows(algo, members, policy)
        rows.append(
            {
                "stage": f"+{algo.upper()}",
                "algo": algo,
                "iteration": min(r["iteration"] for r in final),
                **_stat_row([[r] for r in final], keys, level),
            }
        )
    return pd.DataFrame(rows)


def table4(
    runs: list[str | Path], baseline: str | Path | None = None, level: float = 0.95, policy: str = "last"
) -> pd.DataFrame:
    """GPR Table 4 analogue: online metrics per stage, each stage vs the previous one and vs ``BASELINE``.

    Stages as in ``table3``: VAFT (the iteration-0 evaluations), then every label's last evaluation; an RL
    stage's previous stage is VAFT (they all start from it). The change vs the previous stage is paired by
    starting generator (one per seed: the same pre-training, and every run sees the same held-out
    sessions): per run d = x_run / x_VAFT(run's generator) - 1, then mean and t interval over runs. The
    change vs the baseline (``cascade-privileged``, a labelled reference) is ``gpr_sim.stats.relative_change``
    of the stage's per-seed values against the baseline's estimate and CI from ``baseline``: the seeds' spread
    plus the baseline's session-sampling error. The stage's own session-sampling error is in neither (all
    seeds see the same sessions); as those are the baseline's sessions too, it partly cancels the
    baseline's, which is why only the baseline's is counted.

    Args:
        runs: ``agents.hepo`` run folders (any algorithms and seeds).
        baseline: an ``agents.evaluate`` output folder with a ``cascade-privileged`` row (or, from before the
            rename, ``cascade``), on the runs' held-out sessions (warns where its config says otherwise);
            None = no baseline columns.
        level: coverage of every interval.
        policy: each run's evaluation to report: "last", or "best" (where its best policy was chosen,
            ``agents.reporting.folders.best_row``).

    Returns:
        Columns ``stage``, ``algo``, ``n`` (seeds; VAFT: starting generators), ``iteration``, ``prev``
        (the previous stage, empty for VAFT), then per metric of ``TABLE4`` the mean with ``_ci_low`` /
        ``_ci_high``, ``{name}_vs_prev`` (relative change; NaN for VAFT) with its interval and, with a
        baseline, ``{name}_vs_cascade-privileged`` with its interval; a first ``cascade-privileged`` row holds
        the baseline's own values and CI over sessions (``n`` and ``iteration`` empty).
    """
    groups = group_runs(runs)
    every = [run for members in groups.values() for run in members]
    start = {
        u: {m: float(np.mean([r.get(f"eval/{m}", math.nan) for r in rows])) for m in TABLE4}
        for u, rows in start_units(every).items()
    }
    stages = [(START, "vaft", 0, "", list(start.values()), None)]
    for algo, members in groups.items():
        final = final_rows(algo, members, policy)
        values = [{m: r.get(f"eval/{m}", math.nan) for m in TABLE4} for r in final]
        stages.append(
            (
                f"+{algo.upper()}",
                algo,
                min(r["iteration"] for r in final),
                START,
                values,
                [start[start_key(run)] for run in members],
            )
        )
    ref = None
    rows = []
    if baseline is not None:
        ref, cfg = read_baseline(baseline)
        check_protocol(every, cfg, Path(baseline))
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
                vs = relative_change(
                    x,
                    ref[k],
                    ref[f"{k}_ci_low"],
                    ref[f"{k}_ci_high"],
                    ref_level=cfg["level"],
                    level=level,
                    nan_policy="propagate",
                )
                row.update(vs.columns(f"{m}_vs_{BASELINE}"))
        rows.append(row)
    return pd.DataFrame(rows).astype({"n": "Int64", "iteration": "Int64"})


def table5(
    runs: list[str | Path], baseline: str | Path | None = None, level: float = 0.95, policy: str = "last"
) -> pd.DataFrame:
    """GPR Table 5 analogue: Table 4's online metrics per stage within each stratum group.

    Stages as in ``table4`` (VAFT: the iteration-0 evaluations, one unit per starting generator; then every
    label's last evaluation); strata as in ``gpr_sim.metrics.summarize_strata``: user activity tiers 1..5
    (sessions split by their user's tier) and new / old ads (each session's ads split by age; no reward).
    Each value is the mean over seeds of the runs' per-group evaluation values (``strata_key``) with a t
    interval over seeds, as in ``final_table``; an empty group in one run (NaN) makes the stage's value NaN.

    Args:
        runs: ``agents.hepo`` run folders whose evaluations log strata (raises ``ValueError`` naming those
            that do not: folders written before the Evaluator logged them).
        baseline: an ``agents.evaluate`` output folder (``summary.json`` with a ``cascade-privileged`` row,
            ``strata.csv``); None = no baseline rows.
        level: coverage of the t interval over seeds.
        policy: each run's evaluation to report: "last", or "best" (where its best policy was chosen,
            ``agents.reporting.folders.best_row``).

    Returns:
        One row per (stratum, group, stage), in ``STRATA`` order then stage order: ``stratum``, ``group``,
        ``stage``, ``algo``, ``n`` (seeds; VAFT: starting generators), ``iteration``, ``sessions`` (mean
        held-out sessions in the group; an ad-age group counts every session), then per metric of
        ``TABLE5`` the mean, ``_ci_low`` and ``_ci_high`` (NaN where the stratum has no such metric:
        ``STRATA_METRICS``). With a baseline each group starts with a ``cascade-privileged`` row: its value and CI
        over sessions (``n`` and ``iteration`` empty).
    """
    groups = group_runs(runs)
    every = [run for members in groups.values() for run in members]
    missing = runs_without_strata(every)
    if missing:
        raise ValueError(
            f"no per-stratum evaluations ({STRATA_MARKER!r} ...) in the metrics.jsonl of: "
            f"{', '.join(map(str, missing))}: run folders from before agents.hepo logged them"
        )
    stages = [(START, "vaft", 0, list(start_units(every).values()))]
    for algo, members in groups.items():
        final = final_rows(algo, members, policy)
        stages.append((f"+{algo.upper()}", algo, min(r["iteration"] for r in final), [[r] for r in final]))
    ref = None
    if baseline is not None:
        _, cfg = read_baseline(baseline)
        check_protocol(every, cfg, Path(baseline))
        ref = read_baseline_strata(baseline)
    rows = []
    for stratum, names in STRATA.items():
        metrics = STRATA_METRICS[stratum]
        for group in names:
            where = {"stratum": stratum, "group": group}
            if ref is not None:
                r = ref.get((stratum, group), {})
                own = {f"{m}{s}": r.get(f"eval/{m}{s}", math.nan) for m in metrics for s in CI_SUFFIXES}
                rows.append(
                    {
                        **where,
                        "stage": BASELINE,
                        "algo": BASELINE,
                        "n": None,
                        "iteration": None,
                        "sessions": r.get("eval/sessions", math.nan),
                        **own,
                    }
                )
            keys = {m: strata_key(stratum, group, m) for m in metrics}
            for stage, algo, iteration, units in stages:
                stat = _stat_row(units, {"sessions": strata_key(stratum, group, "sessions"), **keys}, level)
                rows.append(
                    {
                        **where,
                        "stage": stage,
                        "algo": algo,
                        "iteration": iteration,
                        **{k: v for k, v in stat.items() if not k.startswith("sessions_")},
                    }
                )
    columns = ["stratum", "group", "stage", "algo", "n", "iteration", "sessions"]
    columns += [f"{m}{s}" for m in TABLE5 for s in CI_SUFFIXES]
    return pd.DataFrame(rows, columns=columns).astype({"n": "Int64", "iteration": "Int64"})


def pretrain_table(runs: list[str | Path]) -> pd.DataFrame:
    """One row per ``agents.pretrain`` run: stage, steps, first and last held-out metrics, popularity."""
    rows = []
    for run in check_runs(runs):
        cfg, metrics = read_json(run / "config.json"), read_metrics(run / "metrics.jsonl")
        k = pretrain_top_k(run)
        first, last = metrics[0], metrics[-1]
        rows.append(
            {
                "run": run.name,
                "stage": cfg.get("stage", run.name),
                "steps": last["step"],
                "eval_loss_start": first["eval/loss"],
                "eval_loss_end": last["eval/loss"],
                f"hitrate@{k}_start": first[f"eval/hitrate@{k}"],
                f"hitrate@{k}_end": last[f"eval/hitrate@{k}"],
                f"pop_hitrate@{k}": last[f"eval/pop_hitrate@{k}"],
                f"ndcg@{k}_start": first[f"eval/ndcg@{k}"],
                f"ndcg@{k}_end": last[f"eval/ndcg@{k}"],
                f"pop_ndcg@{k}": last[f"eval/pop_ndcg@{k}"],
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- markdown


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
    """Three tables: the metrics, the change vs the previous stage, and (with a baseline) vs ``BASELINE``."""
    head = "| stage | n | " + " | ".join(TABLE4) + " |\n|" + "---|" * (len(TABLE4) + 2) + "\n"

    def lines(part, cell):
        return "".join(
            f"| {r['stage']} | {'' if pd.isna(r['n']) else r['n']} | "
            + " | ".join(cell(r, m) for m in TABLE4)
            + " |\n"
            for _, r in part.iterrows()
        )

    stages = table[table["stage"] != BASELINE]
    out = (
        f"online metrics (revenue_per_session = the advertisers' cost): mean over seeds [{level:.0%} t interval "
        f"over seeds; none with one seed]"
        + (
            f"; {BASELINE} ({BASELINE_NOTE}): agents.evaluate, CI over its sessions"
            if (table["stage"] == BASELINE).any()
            else ""
        )
        + "\n\n"
        + head
        + lines(table, estimate_cell)
    )
    out += (
        f"\nrelative change vs the previous stage ({START} for every RL stage), paired by seed: mean of "
        f"x / x_prev - 1 [{level:.0%} t interval over seeds]\n\n"
        + head
        + lines(stages[stages["prev"] != ""], lambda r, m: change_cell(r, f"{m}_vs_prev"))
    )
    if f"{TABLE4[0]}_vs_{BASELINE}" in table:
        out += (
            f"\nrelative change vs {BASELINE}: mean(x) / {BASELINE} - 1 [{level:.0%} interval: seed spread "
            f"and the {BASELINE}'s CI, delta method, Welch-Satterthwaite df]\n\n"
            + head
            + lines(stages, lambda r, m: change_cell(r, f"{m}_vs_{BASELINE}"))
        )
    return out


def table5_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """One table per stratum: a row per (group, stage), ``mean [low, high]`` per metric the stratum has."""
    cascade = (table["stage"] == BASELINE).any()
    out = (
        f"online metrics by stratum (revenue_per_session = the advertisers' cost): mean over seeds "
        f"[{level:.0%} t interval over seeds; none with one seed]"
        + (f"; {BASELINE} ({BASELINE_NOTE}): agents.evaluate, CI over its sessions" if cascade else "")
        + "; sessions: held-out sessions in the group (mean over seeds; an ad-age group counts every "
        "session, its metrics count only the ads of that age)\n"
    )
    titles = {"activity_tier": "user activity tier (1 = least active)", "ad_age": "ad age (new / old ads)"}
    for stratum in dict.fromkeys(table["stratum"]):
        part, metrics = table[table["stratum"] == stratum], STRATA_METRICS.get(stratum, TABLE5)
        out += (
            f"\n{titles.get(stratum, stratum)}\n\n| {stratum} | stage | n | sessions | "
            + " | ".join(metrics)
            + " |\n|"
            + "---|" * (len(metrics) + 4)
            + "\n"
        )
        for _, r in part.iterrows():
            sessions = f"{r['sessions']:.4g}" if np.isfinite(r["sessions"]) else "n/a"
            out += (
                f"| {r['group']} | {r['stage']} | {'' if pd.isna(r['n']) else r['n']} | {sessions} | "
                + " | ".join(estimate_cell(r, m) for m in metrics)
                + " |\n"
            )
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
