"""The tables of ``run_side_by_side.sh`` calls (GPU runs side by side, one seed per call), over seeds.

    python benchmarks/side_by_side_table.py benchmarks/results/gpu_d6/seed0 benchmarks/results/gpu_d6/seed1/call2 \
        --reference hepo --out benchmarks/results/gpu_d6/table

Each folder is one call's ``results.tgz`` unpacked (or the last call of a chained seed): its run folders
(``NAME/metrics.jsonl``, ``NAME/config.json``) and, with ``FINAL_S``, ``final/summary.csv`` and
``final/paired.csv`` (``agents.evaluate`` on other sessions: every run's ``best/``, the MTP and VAFT generators
``pre/mtp`` and ``pre/vaft``, and the learned cascade, paired by user against the first run's best). The seed is
the ``seed`` of the runs' ``config.json`` (every run of a call shares it). Three tables:

- runs: per seed and run, the iterations run, the evaluation its best policy was chosen at
  (``agents.reporting.folders.best_row``) and ``oracle_share`` at the start, there and at the end;
- per seed: each agent's paired difference to ``--reference`` on that seed's final sessions, with the
  interval over sessions (what one trained policy's comparison can resolve);
- pooled (two seeds or more): the per-seed differences averaged, with the interval over all the seeds' sessions
  (the standard errors combined: sqrt(sum se^2) / seeds) and its half-width in % of the reference's mean, the
  issue's power criterion (<= 1%); conditional on the trained policies, so it leaves out how training varies;
- over seeds: each metric's mean and the paired difference to the reference with the t interval over seeds
  (``agents.reporting.sweep.comparison_table``: how much training itself varies; none with one seed).

Agents are named by their spec: ``gpr:.../pre/vaft@...`` is ``vaft`` (``pre/mtp``: ``mtp``),
``gpr:.../NAME/best@...`` is ``NAME``, ``learned-cascade:...`` is ``learned-cascade``. Writes ``--out``.md and
``--out``.json when given.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from agents.reporting.folders import best_row, eval_rows, update_gradients
from agents.reporting.keys import BEST_METRIC, GRADIENT_COLUMNS
from agents.reporting.sweep import FINAL_METRICS, comparison_markdown, comparison_table
from gpr_sim.runs import atomic_write_bytes, read_json, read_metrics, write_json

PAIRED_METRICS = (
    "oracle_share",
    "reward_per_session",
    "revenue_per_session",
    "gmv_per_session",
    "gmv_per_session_expected",
    "ctcvr",
    "ctcvr_expected",
)
"""metrics of the per-seed paired table (``paired.csv``'s ``metric`` column; n/a where a call predates one: the
``*_expected`` ones, ``gpr_sim.metrics``' conditional expectations, came after seed 2)"""
SPEC_NAMES = (
    (re.compile(r"^gpr:.*/pre/(mtp|vaft)(?:@.*)?$"), None),
    (re.compile(r"^gpr:.*/([^/@]+)/best(?:@.*)?$"), None),
    (re.compile(r"^learned-cascade:"), "learned-cascade"),
)
"""an agent spec of the final evaluation -> its name (None: the run folder's name, the pattern's group)"""


def agent_name(spec: str) -> str:
    """The short name of a final-evaluation agent spec (``SPEC_NAMES``); the spec itself when none matches."""
    for pattern, name in SPEC_NAMES:
        match = pattern.match(spec)
        if match:
            return name or match.group(1)
    return spec


def call_runs(folder: Path) -> list[Path]:
    """The run folders of one call (sub-folders with a ``metrics.jsonl``), by name."""
    return sorted(p.parent for p in folder.glob("*/metrics.jsonl"))


def call_seed(folder: Path) -> int:
    """The seed every run of the call was trained with; raises when they differ or there is no run."""
    runs = call_runs(folder)
    seeds = {int(read_json(r / "config.json")["seed"]) for r in runs}
    if len(seeds) != 1:
        raise ValueError(
            f"{folder}: expected the runs of one seed, found seeds {sorted(seeds)} in {len(runs)} runs"
        )
    return seeds.pop()


def runs_table(folders: list[Path]) -> pd.DataFrame:
    """Per seed and run: iterations run, the best policy's evaluation, oracle_share at start / best / end, and the
    update's gradients over the run (``update_gradients``: the policy's and the critic's norms before the clip, the
    share of policy steps it scaled; NaN for runs from before they were logged)."""
    rows = []
    for folder in folders:
        seed = call_seed(folder)
        for run in call_runs(folder):
            evals, best = eval_rows(run), best_row(run)
            rows.append(
                {
                    "seed": seed,
                    "run": run.name,
                    "iterations": int(read_metrics(run / "metrics.jsonl")[-1]["iteration"]),
                    "best_iteration": int(best["iteration"]),
                    "best_value": best[BEST_METRIC],
                    "oracle_share_start": evals[0].get("eval/oracle_share"),
                    "oracle_share_best": best.get("eval/oracle_share"),
                    "oracle_share_end": evals[-1].get("eval/oracle_share"),
                    **update_gradients(run),
                }
            )
    return pd.DataFrame(rows)


def final_values(folders: list[Path]) -> dict[str, dict[int, dict]]:
    """agent -> seed -> that seed's final-evaluation metrics (``final/summary.csv``), every folder that has one."""
    values: dict[str, dict[int, dict]] = {}
    for folder in folders:
        summary = folder / "final" / "summary.csv"
        if not summary.is_file():
            continue
        seed = call_seed(folder)
        for row in pd.read_csv(summary).to_dict("records"):
            values.setdefault(agent_name(str(row["agent"])), {})[seed] = row
    return values


def final_eval_seed(folders: list[Path]) -> int:
    """The reset seed of the calls' final evaluations (``final/config.json``); raises when they differ."""
    seeds = {int(read_json(f / "final" / "config.json")["seed"]) for f in folders if (f / "final").is_dir()}
    if len(seeds) != 1:
        raise ValueError(f"the final evaluations ran on reset seeds {sorted(seeds)}: expected one")
    return seeds.pop()


def paired_table(folders: list[Path], reference: str) -> pd.DataFrame:
    """Per seed, agent and metric: the paired difference to ``reference`` on the seed's final sessions."""
    rows = []
    for folder in folders:
        path = folder / "final" / "paired.csv"
        if not path.is_file():
            continue
        seed, paired = call_seed(folder), pd.read_csv(path)
        refs = {agent_name(str(r)) for r in paired["reference"]}
        if refs != {reference}:
            raise ValueError(f"{path}: paired against {sorted(refs)}, not --reference {reference!r}")
        for r in paired[paired["metric"].isin(PAIRED_METRICS)].to_dict("records"):
            rows.append(
                {
                    "seed": seed,
                    "agent": agent_name(str(r["agent"])),
                    "metric": r["metric"],
                    "pairs": int(r["pairs"]),
                    "difference": r["difference"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                    "std_err": r.get("std_err", math.nan),
                    "reference_value": r.get("reference_value", math.nan),
                }
            )
    return pd.DataFrame(rows)


def pooled_table(paired: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per agent and metric over the seeds of ``paired`` (``paired_table``): the mean of the per-seed differences
    and its interval over every seed's sessions (independent seeds: the variance of the mean is sum se^2 /
    seeds^2), with the half-width in % of the reference's mean over seeds. Rows lacking a standard error (calls
    before ``paired.csv`` had one) are left out."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    rows = []
    for (agent, metric), part in paired.dropna(subset=["std_err"]).groupby(["agent", "metric"], sort=False):
        k = len(part)
        diff, se = part["difference"].mean(), math.sqrt((part["std_err"] ** 2).sum()) / k
        ref = part["reference_value"].mean()
        rows.append(
            {
                "agent": agent,
                "metric": metric,
                "seeds": k,
                "pairs": int(part["pairs"].sum()),
                "difference": diff,
                "ci_low": diff - z * se,
                "ci_high": diff + z * se,
                "half_width_pct": 100 * z * se / abs(ref) if ref else math.nan,
            }
        )
    return pd.DataFrame(rows)


def _difference_cells(part: pd.DataFrame, with_half_width: bool = False) -> str:
    """One table row's cells over ``PAIRED_METRICS`` from ``part``'s rows (one per metric): ``difference
    [ci_low, ci_high]``, with ``(half_width_pct%)`` when asked; n/a for a metric ``part`` lacks."""
    cells = part.set_index("metric")
    out = []
    for m in PAIRED_METRICS:
        if m not in cells.index:
            out.append("n/a")
            continue
        c = cells.loc[m]
        text = f"{c['difference']:+.4g} [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]"
        out.append(text + (f" ({c['half_width_pct']:.2g}%)" if with_half_width else ""))
    return " | ".join(out)


def markdown(
    runs: pd.DataFrame,
    paired: pd.DataFrame,
    pooled: pd.DataFrame,
    over_seeds: pd.DataFrame | None,
    reference: str,
) -> str:
    lines = [f"### runs: the best policy's evaluation (highest held-out {BEST_METRIC})", ""]
    lines.append(
        "| seed | run | iterations | best at | its selection metric | oracle_share start | there | end "
        "| gradient norm: policy | critic | policy steps clipped |"
    )
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs.to_dict("records"):
        grads = " | ".join("n/a" if math.isnan(r[k]) else f"{r[k]:.2f}" for k in GRADIENT_COLUMNS)
        lines.append(
            f"| {r['seed']} | {r['run']} | {r['iterations']} | {r['best_iteration']} | "
            f"{r['best_value']:.3f} | {r['oracle_share_start']:.3f} | {r['oracle_share_best']:.3f} | "
            f"{r['oracle_share_end']:.3f} | {grads} |"
        )
    if len(paired):
        lines += [
            "",
            f"### per seed: agent - {reference} on the seed's final sessions [95% interval over sessions]",
            "",
        ]
        lines.append("| seed | agent | pairs | " + " | ".join(PAIRED_METRICS) + " |")
        lines.append("|---:|---|---:|" + "---|" * len(PAIRED_METRICS))
        for (seed, agent), part in paired.groupby(["seed", "agent"], sort=False):
            lines.append(
                f"| {seed} | {agent} | {int(part['pairs'].max())} | " + _difference_cells(part) + " |"
            )
    if len(pooled) and pooled["seeds"].max() > 1:
        lines += [
            "",
            f"### pooled: agent - {reference}, the per-seed differences averaged [95% interval over all the seeds' "
            "sessions; half-width in % of the reference's mean] (conditional on the trained policies)",
            "",
            "| agent | seeds | pairs | " + " | ".join(PAIRED_METRICS) + " |",
            "|---|---:|---:|" + "---|" * len(PAIRED_METRICS),
        ]
        for agent, part in pooled.groupby("agent", sort=False):
            head = f"| {agent} | {int(part['seeds'].max())} | {int(part['pairs'].max())} | "
            lines.append(head + _difference_cells(part, with_half_width=True) + " |")
    if over_seeds is not None:
        lines += ["", comparison_markdown(over_seeds, reference, 0.95)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "folders", type=Path, nargs="+", help="one unpacked call per seed (its run folders, final/)"
    )
    p.add_argument("--reference", default="hepo", help="the agent every other one is compared with")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    for folder in args.folders:
        if not call_runs(folder):
            raise SystemExit(
                f"error: {folder} holds no run folder (NAME/metrics.jsonl): not an unpacked call"
            )
    seeds = [call_seed(f) for f in args.folders]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(
            f"error: two folders of one seed ({seeds}): give one call per seed (the last of a chain)"
        )
    runs, paired = runs_table(args.folders), paired_table(args.folders, args.reference)
    pooled = pooled_table(paired) if len(paired) else pd.DataFrame()
    values = final_values(args.folders)
    over_seeds = None
    if values:
        if args.reference not in values:
            raise SystemExit(
                f"error: --reference {args.reference!r} is not among the agents {sorted(values)}"
            )
        over_seeds = comparison_table(
            {"final": values}, {}, args.reference, 0.95, final_eval_seed(args.folders)
        )
    text = markdown(runs, paired, pooled, over_seeds, args.reference)
    print(text)
    result = {
        "folders": [str(f) for f in args.folders],
        "reference": args.reference,
        "metrics": list(FINAL_METRICS),
        "runs": runs.to_dict("records"),
        "paired": paired.to_dict("records"),
        "pooled": pooled.to_dict("records"),
        "over_seeds": None if over_seeds is None else over_seeds.to_dict("records"),
    }
    if args.out:
        atomic_write_bytes(args.out.with_suffix(".md"), text.encode())
        write_json(args.out.with_suffix(".json"), result)
    return result


if __name__ == "__main__":
    main()
