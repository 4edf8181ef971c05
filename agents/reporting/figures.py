"""The report's figures: evaluation curves with seed bands, the final / Table 3 bars, pre-training curves.

matplotlib with the Agg backend (files only, no display); every figure is written with
``gpr_sim.runs.atomic_write_bytes`` and closed. The bands and error bars are the same Student t interval
over seeds as the tables (``agents.reporting.tables``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402

from agents.reporting.folders import check_runs, pretrain_top_k, run_label  # noqa: E402
from agents.reporting.keys import CURVES, FINAL, GRADIENTS, REWARD_MODEL, START  # noqa: E402
from gpr_sim.runs import atomic_write_bytes, figure_bytes, read_json, read_metrics  # noqa: E402
from gpr_sim.stats import t_interval  # noqa: E402


def _save(fig, path: Path) -> Path:
    return atomic_write_bytes(path, figure_bytes(fig, dpi=110))


def _series(run: Path, metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get(metric) is not None]
    xs = np.array([r.get(x, r.get("iteration", 0)) for r in rows], dtype=float)
    ys = np.array([r[metric] for r in rows], dtype=float)
    lo = f"{metric}_ci_low"
    band = (
        np.array([[r[lo], r[f"{metric}_ci_high"]] for r in rows], dtype=float)
        if rows and lo in rows[0]
        else None
    )
    return xs, ys, band


def _x_axis(ax, x: str) -> None:
    """The x axis of a curve against ``x``: labelled, at most 5 ticks in engineering notation (250k, 1.2M) so
    env-step counts stay legible side by side."""
    ax.set_xlabel(x.replace("_", " "))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _logged_keys(runs: list[Path]) -> set[str]:
    """Every metric key some row of some run logs."""
    return set().union(*(k for run in runs for k in map(dict.keys, read_metrics(run / "metrics.jsonl"))))


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
        curves[label] = {
            "x": series[0][0][:n],
            "mean": ys.mean(0),
            "low": low,
            "high": high,
            "n": len(series),
        }
    return curves


def plot_curves(
    runs: list[Path], path: Path, metrics: tuple[str, ...] = CURVES, x: str = "env_steps", level: float = 0.95
) -> Path:
    """One panel per metric, one line per algorithm (mean over its runs), seed band; saved to ``path``.

    The band is the ``level`` Student t interval over seeds (``seed_curves``), the interval the tables
    report; a single run shows its own CI columns (over sessions) when it has them. The legend says which.
    """
    logged = _logged_keys(runs)
    metrics = tuple(m for m in metrics if m in logged) or metrics[:1]  # a panel per metric some run logs
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, c in seed_curves(runs, metric, x, level).items():
            line = ax.plot(c["x"], c["mean"], marker="o", ms=3, label=f"{label} (n={c['n']})")[0]
            ax.fill_between(c["x"], c["low"], c["high"], color=line.get_color(), alpha=0.2)
        ax.set_title(metric.split("/", 1)[-1])
        _x_axis(ax, x)
        ax.grid(alpha=0.3)
    handles, _ = axes[0][0].get_legend_handles_labels()
    band = Patch(
        color="gray", alpha=0.2, label=f"band: {level:.0%} t interval over seeds (n=1: the run's own CI)"
    )
    # one legend for every panel, under them: inside the first panel it hid that panel's lines and ticks
    fig.legend(
        handles=[*handles, band],
        loc="lower center",
        ncol=min(len(handles) + 1, 2 * len(metrics)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return _save(fig, Path(path))


def _draw(ax, curve: dict | None, color: str, band: bool = True, **style) -> None:
    """One ``seed_curves`` curve on ``ax``: its mean as a line, its band shaded (nothing when ``curve`` is None)."""
    if curve is None:
        return
    ax.plot(curve["x"], curve["mean"], color=color, **style)
    if band:
        ax.fill_between(curve["x"], curve["low"], curve["high"], color=color, alpha=0.15)


def _save_pair(fig, x: str, title: str, path: Path) -> Path:
    """A two-panel monitor's finish: both panels against ``x`` with a grid and a legend, the title, saved."""
    for ax in fig.axes:
        _x_axis(ax, x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_reward_model(runs: list[Path], path: Path, x: str = "env_steps", level: float = 0.95) -> Path | None:
    """The reward model's monitor against env steps, one colour per algorithm (mean over its runs, seed band):
    left, the sampled candidates' value as rewarded (solid) and under the simulator's truth (dashed); right,
    their within-group correlation. Over-optimisation of a learned reward shows as the solid line climbing
    while the dashed one falls. None (nothing written) when no run logs the monitor (runs from before it)."""
    if REWARD_MODEL[1] not in _logged_keys(runs):
        return None
    rewarded, truth, corr = (seed_curves(runs, key, x, level) for key in REWARD_MODEL)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for i, (label, c) in enumerate(rewarded.items()):
        color = f"C{i}"
        _draw(left, c, color, label=f"{label}: rewarded (n={c['n']})")
        _draw(left, truth.get(label), color, ls="--", label=f"{label}: truth (privileged)")
        _draw(right, corr.get(label), color, label=label)
    left.set_title("sampled candidates' value per request")
    right.set_title("within-group correlation, reward vs truth")
    return _save_pair(fig, x, f"the reward model's monitor; bands: {level:.0%} t interval over seeds", path)


def _shared_setting(runs: list[Path], name: str, default=None):
    """The ``agents.hepo`` flag ``name`` of every run's ``config.json`` (``args``; ``default`` where a run's record
    predates it) when they all record the same value, else None."""
    values = {
        json.dumps(read_json(Path(run) / "config.json").get("args", {}).get(name, default)) for run in runs
    }
    return json.loads(values.pop()) if len(values) == 1 else None


def plot_gradients(runs: list[Path], path: Path, x: str = "env_steps", level: float = 0.95) -> Path | None:
    """The update's gradients against env steps, one colour per algorithm: left, the mean over its runs of the norm of
    the policy's gradient (solid) and of the critic's (dashed) before the clip (log scale; the policy's line starts
    after the critic warm-up, whose iterations have no policy loss and log 0), with the clip's limit when every run
    shares it; right, the share of minibatches whose policy step the clip scaled (mean, seed band). With one clip
    over both (``--grad-clip joint``) a critic line above the limit scales the policy's step whatever its own norm.
    None (nothing written) when no run logs them (runs from before they were logged)."""
    if GRADIENTS[0] not in _logged_keys(runs):
        return None
    policy, critic, clipped = (seed_curves(runs, key, x, level) for key in GRADIENTS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for i, (label, c) in enumerate(policy.items()):
        color = f"C{i}"
        stepped = dict(c, mean=np.where(c["mean"] > 0, c["mean"], np.nan))  # a gap, not a drop to the axis
        _draw(left, stepped, color, band=False, label=f"{label}: policy (n={c['n']})")
        _draw(left, critic.get(label), color, band=False, ls="--", label=f"{label}: critic")
        _draw(right, clipped.get(label), color, marker="o", ms=3, label=label)
    limit = _shared_setting(runs, "max_grad_norm")
    if limit is not None:
        clip = _shared_setting(runs, "grad_clip", "joint") or "mixed"
        left.axhline(limit, color="gray", lw=1, ls=":", label=f"clip limit {limit:g} ({clip})")
    left.set_yscale("log")
    left.set_title("gradient norm before the clip (mean over seeds)")
    right.set_title("minibatches whose policy step was clipped")
    right.set_ylim(-0.05, 1.05)
    return _save_pair(fig, x, f"the update's gradients; band: {level:.0%} t interval over seeds", path)


def plot_table(
    table: pd.DataFrame, path: Path, metrics: tuple[str, ...] = FINAL, level: float = 0.95
) -> Path:
    """Bars of a ``final_table`` / ``table3`` frame, one panel per metric, t-interval error bars."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    x = np.arange(len(table))
    colors = ["tab:gray" if s == START else f"C{i}" for i, s in enumerate(table["stage"])]
    for ax, name in zip(axes[0], metrics):
        v = table[name].to_numpy(float)
        err = np.stack(
            [v - table[f"{name}_ci_low"].to_numpy(float), table[f"{name}_ci_high"].to_numpy(float) - v]
        )
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


def step_offsets(runs: list[Path]) -> dict[Path, int]:
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


def plot_pretrain(runs: list[str | Path], path: Path) -> Path:
    """Held-out loss, HitRate@K and nDCG@K against steps, one line per run (a VAFT run continues the
    MTP run it started from on the x axis), popularity baseline dashed; saved to ``path``."""
    runs = check_runs(runs)
    offsets = step_offsets(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        k, rows = pretrain_top_k(run), read_metrics(run / "metrics.jsonl")
        label = read_json(run / "config.json").get("stage", run.name)
        steps = np.array([r["step"] for r in rows], dtype=float) + offsets[run]
        line = axes[0].plot(
            steps, [r["eval/loss"] for r in rows], marker="o", ms=3, label=f"{label} held-out"
        )[0]
        train = [(s, r["train/loss_mtp"]) for s, r in zip(steps, rows) if "train/loss_mtp" in r]
        if train:
            axes[0].plot(*zip(*train), ls=":", color=line.get_color(), label=f"{label} train (MTP term)")
        for ax, name in zip(axes[1:], (f"hitrate@{k}", f"ndcg@{k}")):
            ax.plot(
                steps,
                [r[f"eval/{name}"] for r in rows],
                marker="o",
                ms=3,
                color=line.get_color(),
                label=label,
            )
            ax.plot(
                steps,
                [r[f"eval/pop_{name}"] for r in rows],
                ls="--",
                color="gray",
                label="popularity" if run == runs[0] else None,
            )
            ax.set_title(f"held-out {name}")
    axes[0].set_title("loss (each stage's own target weights)")
    for ax in axes:
        ax.set_xlabel("optimiser steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))
