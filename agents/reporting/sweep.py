"""The tables and figure of a learning-rate sweep (``agents.sweep``), from plain tables and dicts, no training.

    selected = select_lr(sweep, "eval/oracle_share")        # per variant x algo x lr, `selected` on the pick
    table = comparison_table(values, lrs, "hepo")            # final evaluation: means over seeds, paired deltas

Intervals are over training seeds (``gpr_sim.stats.t_interval``, NaN with one seed): the per-run intervals of
an evaluation measure its sessions' noise, the seed interval how much training itself varies. The paired
difference to the reference algorithm pairs runs of the same seed (same VAFT generator, same final-evaluation
users: ``gpr_sim.stats.paired_difference``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from agents.policies import policy_label
from agents.reporting.tables import estimate_cell
from gpr_sim.runs import atomic_write_bytes, figure_bytes
from gpr_sim.stats import nan_estimate, paired_difference, t_interval

FINAL_METRICS = (
    "eval/oracle_share",
    "eval/reward_per_session",
    "eval/revenue_per_session",
    "eval/gmv_per_session",
    "eval/ctr",
    "eval/ctcvr",
    "eval/session_length",
)
"""metrics of ``sweep.csv`` (the runs' last evaluation) and of the final comparison"""


def select_lr(sweep: pd.DataFrame, metric: str, level: float = 0.95) -> pd.DataFrame:
    """Per variant x algo x lr: ``metric``'s mean over seeds with its t interval, and ``selected`` on the lr of
    the highest mean of each variant x algo (ties: the smaller lr; NaN means never win).

    Args:
        sweep: ``sweep_table``'s columns ``variant``, ``algo``, ``lr``, ``seed`` and ``metric``.

    Raises:
        ValueError: a variant x algo whose every lr has a NaN mean.
    """
    rows = []
    for (variant, algo, lr), part in sweep.groupby(["variant", "algo", "lr"], sort=False):
        est = t_interval(part[metric].to_numpy(float), level, nan_policy="propagate")
        rows.append({"variant": variant, "algo": algo, "lr": lr, "seeds": len(part), **est.columns(metric)})
    table = pd.DataFrame(rows)
    table["selected"] = False
    for (variant, algo), part in table.groupby(["variant", "algo"], sort=False):
        means = part[metric].to_numpy(float)
        if not np.isfinite(means).any():
            raise ValueError(f"{variant}/{algo}: no learning rate has a finite mean {metric}")
        order = np.lexsort((part["lr"].to_numpy(float), -np.nan_to_num(means, nan=-np.inf)))
        table.loc[part.index[order[0]], "selected"] = True
    return table


def format_selected(table: pd.DataFrame, metric: str, level: float) -> str:
    """Per variant: algorithms as rows, learning rates as columns, ``mean [low, high]``, * on the selected."""
    parts = []
    for variant, part in table.groupby("variant", sort=False):
        cells = {}
        for _, r in part.iterrows():
            mark = " *" if r["selected"] else ""
            cells.setdefault(r["algo"], {})[lr_name(r["lr"])] = estimate_cell(r, metric, ".3f") + mark
        parts.append(
            f"{variant}: {metric}, mean over seeds [{level:.0%} t interval], * selected\n"
            + pd.DataFrame(cells).T.to_string()
        )
    return "\n\n".join(parts)


def lr_name(lr: float) -> str:
    """``lr0.0003``: a learning rate as its run folders and tables name it."""
    return f"lr{lr:g}"


def comparison_table(
    values: dict[str, dict[str, dict[int, dict]]],
    lrs: dict[str, dict[str, float]],
    reference: str,
    level: float = 0.95,
    final_eval_seed: int | None = None,
) -> pd.DataFrame:
    """Per variant x agent: every ``FINAL_METRICS`` mean over seeds with its t interval (``NAME``,
    ``NAME_ci_low``, ``NAME_ci_high``, the key without ``eval/``) and the paired difference to the
    ``reference`` agent over the seeds both have (``delta_NAME``; NaN on the reference's own row).

    Args:
        values: variant -> agent -> seed -> that seed's final-evaluation metrics (``eval/...`` keys).
        lrs: variant -> algorithm -> selected lr (agents without one, the references, get NaN).
        reference: the agent the differences are taken to; every variant must have it.
        final_eval_seed: recorded in a column of that name (the reset seed of the evaluation).
    """
    rows = []
    for variant, by_agent in values.items():
        ref = by_agent[reference]
        for name, by_seed in by_agent.items():
            seeds, common = sorted(by_seed), sorted(s for s in by_seed if s in ref)
            row = {
                "variant": variant,
                "agent": policy_label(name),
                "lr": lrs.get(variant, {}).get(name, math.nan),
                "seeds": len(seeds),
                "final_eval_seed": final_eval_seed,
            }
            for key in FINAL_METRICS:
                col = key.removeprefix("eval/")
                mean = t_interval([by_seed[s][key] for s in seeds], level, nan_policy="propagate")
                row.update(mean.columns(col))
                x, y = [by_seed[s][key] for s in common], [ref[s][key] for s in common]
                own = name == reference or not common
                delta = nan_estimate() if own else paired_difference(x, y, level, nan_policy="propagate")
                row.update(delta.columns(f"delta_{col}"))
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame, reference: str, level: float) -> str:
    """Per variant a markdown table: ``mean [low, high]`` over seeds per metric, then the paired differences."""
    cols = [k.removeprefix("eval/") for k in FINAL_METRICS]
    out = []
    for variant, part in table.groupby("variant", sort=False):
        seed = int(part["final_eval_seed"].iloc[0])
        out.append(
            f"### {variant}: final evaluation (reset seed {seed}), mean over seeds [{level:.0%} t interval]\n"
        )
        out.append("| agent | lr | seeds | " + " | ".join(cols) + " |")
        out.append("|" + "---|" * (len(cols) + 3))
        for _, r in part.iterrows():
            lr = "" if not np.isfinite(r["lr"]) else f"{r['lr']:g}"
            out.append(
                f"| {r['agent']} | {lr} | {r['seeds']} | "
                + " | ".join(estimate_cell(r, c) for c in cols)
                + " |"
            )
        out.append(f"\npaired difference to {reference} over seeds [{level:.0%} t interval]\n")
        out.append("| agent | " + " | ".join(cols) + " |")
        out.append("|" + "---|" * (len(cols) + 1))
        for _, r in part[part["agent"] != reference].iterrows():
            out.append(
                f"| {r['agent']} | " + " | ".join(estimate_cell(r, f"delta_{c}", "+.4g") for c in cols) + " |"
            )
        out.append("")
    return "\n".join(out)


def plot_sweep(table: pd.DataFrame, metric: str, path: Path, level: float) -> Path:
    """``metric`` vs lr (log axis), one line per algorithm with t-interval error bars, the selected lr ringed;
    one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(table["variant"]))
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for algo, part in table[table["variant"] == variant].groupby("algo", sort=False):
            part = part.sort_values("lr")
            v = part[metric].to_numpy(float)
            err = np.nan_to_num(
                np.stack([v - part[f"{metric}_ci_low"], part[f"{metric}_ci_high"] - v]), nan=0.0
            )
            line = ax.errorbar(part["lr"], v, yerr=err, capsize=3, marker="o", label=algo)
            sel = part[part["selected"]]
            ax.plot(sel["lr"], sel[metric], "o", ms=12, mfc="none", color=line[0].get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{variant}: {metric}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"mean over seeds, {level:.0%} t interval")
    fig.tight_layout()
    return atomic_write_bytes(path, figure_bytes(fig, dpi=110))
