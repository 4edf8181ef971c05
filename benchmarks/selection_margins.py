"""How well a run's held-out evaluation separates its iterations: the paired margins of the best-checkpoint rule.

    python benchmarks/selection_margins.py runs/margin/*_s* --out benchmarks/results/selection_margins/cpu_demo

``agents.hepo`` keeps as ``OUT/best`` the evaluation with the highest ``eval/reward_per_session`` and logs, at
every later evaluation, its difference to the best one before it paired session by session
(``eval/reward_per_session_vs_best``, ``agents.evaluation.heldout.paired_margin``). This reads those rows back
from run folders and says, over every evaluation after a run's first:

- the paired interval's half-width against the unpaired one of the same difference (the two rows' own
  intervals combined, sqrt(h_a^2 + h_b^2)): what pairing by user buys, as the variance reduction
  (unpaired / paired half-width, squared);
- of the evaluations that became a new best, how many beat the best before them by more than their paired
  interval (its lower end above 0), and of those that did not, how many fell below it resolved: whether the
  rule chooses on signal or on its sessions' noise;
- how many evaluations were resolved above the run's start (``eval/reward_per_session_vs_start``, logged from
  the twentieth session's later commits): whether RL's gain over the VAFT start is one the evaluation resolves,
  which ``--best-rule resolved`` needs before it ships anything but the start.

An evaluation of the same policy as the best (a critic warm-up iteration steps no policy) plays the same sessions
to the bit: a margin of exactly 0 with a zero-width interval, the check that the pairing is exact. Those are
counted apart and left out of the rest.

Runs from before the margin was logged have no such rows and are named, not counted. Prints the tables; writes
``--out``.md and ``--out``.json when given.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from agents.reporting.folders import check_runs, eval_rows, run_label  # noqa: E402
from agents.reporting.keys import BEST_ITERATION, BEST_METRIC, margin_key  # noqa: E402
from gpr_sim.runs import atomic_write_bytes, read_json, write_json  # noqa: E402

MARGIN = margin_key("best")
"""the paired difference to the best evaluation before, as ``agents.hepo`` logs it"""
START = margin_key("start")
"""the paired difference to the run's iteration-0 evaluation (its start), logged beside it"""


def margin_rows(run: Path) -> pd.DataFrame:
    """One row per evaluation of ``run`` after its first that logged a margin: iteration, value, the row's own
    interval half-width, the margin with its paired half-width, the unpaired half-width of the same difference,
    and whether the evaluation became the new best: the one the run logged it chose (``BEST_ITERATION``, whatever
    its ``--best-rule``), or in folders from before that was logged, strictly above every earlier one (the
    ``highest`` rule, the only one then)."""
    rows, out, best, best_half = eval_rows(run), [], -math.inf, math.nan
    for r in rows:
        value = r[BEST_METRIC]
        half = (r[f"{BEST_METRIC}_ci_high"] - r[f"{BEST_METRIC}_ci_low"]) / 2
        new_best = r[BEST_ITERATION] == r["iteration"] if BEST_ITERATION in r else value > best
        if MARGIN in r:
            out.append(
                {
                    "iteration": r["iteration"],
                    "value": value,
                    "half_width": half,
                    "margin": r[MARGIN],
                    "paired_half_width": (r[f"{MARGIN}_ci_high"] - r[f"{MARGIN}_ci_low"]) / 2,
                    "unpaired_half_width": math.hypot(half, best_half),
                    "new_best": new_best,
                    "resolved_above": r[f"{MARGIN}_ci_low"] > 0,
                    "resolved_below": r[f"{MARGIN}_ci_high"] < 0,
                    # the start's margin where logged (runs from before it: None)
                    "above_start_resolved": r[f"{START}_ci_low"] > 0 if START in r else None,
                    # the same sessions to the bit: the policy had not changed (a critic warm-up iteration)
                    "identical": r[MARGIN] == 0 and r[f"{MARGIN}_ci_low"] == r[f"{MARGIN}_ci_high"],
                }
            )
        if new_best:
            best, best_half = value, half
    return pd.DataFrame(out)


def summary_row(label: str, frame: pd.DataFrame) -> dict:
    """The section's table row of a group of runs' margin rows (module doc); evaluations identical to the best
    (the same policy: every session the same, a zero-width interval) are counted apart, not in the medians."""
    identical = int(frame["identical"].sum())
    frame = frame[~frame["identical"]]
    new = frame[frame["new_best"]]
    rest = frame[~frame["new_best"]]
    paired, unpaired = frame["paired_half_width"].median(), frame["unpaired_half_width"].median()
    return {
        "runs": label,
        "evaluations": len(frame),
        "paired_half_width_median": paired,
        "unpaired_half_width_median": unpaired,
        "variance_reduction": (unpaired / paired) ** 2 if paired > 0 else math.nan,
        "new_bests": len(new),
        "new_bests_resolved": int(new["resolved_above"].sum()),
        "new_best_margin_median": new["margin"].median() if len(new) else math.nan,
        "not_best": len(rest),
        "not_best_resolved_below": int(rest["resolved_below"].sum()),
        "identical": identical,
        "above_start_resolved": int(frame["above_start_resolved"].eq(True).sum()),  # None: not logged
        "with_start_margin": int(frame["above_start_resolved"].notna().sum()),
    }


def markdown(table: pd.DataFrame) -> str:
    head = (
        "| runs | evaluations | paired half-width (median) | unpaired half-width (median) | variance reduction | "
        "new bests | of which above the best before, resolved | new best's margin (median) | other evaluations "
        "| of which below the best, resolved | identical to the best (policy unchanged) | above the start, resolved "
        "(of those logging it) |"
    )
    lines = [head, "|---|" + "---:|" * 11]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['runs']} | {r['evaluations']} | {r['paired_half_width_median']:.4f} | "
            f"{r['unpaired_half_width_median']:.4f} | {r['variance_reduction']:.2f} | {r['new_bests']} | "
            f"{r['new_bests_resolved']} | {r['new_best_margin_median']:+.4f} | {r['not_best']} | "
            f"{r['not_best_resolved_below']} | {r['identical']} | {r['above_start_resolved']} of "
            f"{r['with_start_margin']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="agents.hepo run folders")
    p.add_argument("--out", default="", help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    runs = check_runs(args.runs)
    frames, without = {}, []
    for run in runs:
        frame = margin_rows(run)
        if frame.empty:
            without.append(str(run))
            continue
        frames[run] = frame.assign(label=run_label(run), seed=read_json(run / "config.json").get("seed"))
    if not frames:
        raise ValueError(f"no run logged {MARGIN!r} (folders from before agents.hepo paired its evaluations)")
    every = pd.concat(frames.values(), ignore_index=True)
    groups = [(label, every[every["label"] == label]) for label in dict.fromkeys(every["label"])]
    table = pd.DataFrame([summary_row(label, f) for label, f in groups] + [summary_row("all", every)])
    text = markdown(table)
    if without:
        text += f"\nwithout margins (not counted): {', '.join(without)}\n"
    print(text)
    res = {
        "runs": [str(r) for r in frames],
        "without_margins": without,
        "summary": table.to_dict("records"),
        "evaluations": every.to_dict("records"),
        "median_row_half_width": statistics.median(every["half_width"]),
    }
    if args.out:
        atomic_write_bytes(f"{args.out}.md", text.encode())
        write_json(f"{args.out}.json", res)
    return res


if __name__ == "__main__":
    run_main(main)
