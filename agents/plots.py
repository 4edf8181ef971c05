"""Plots from run folders: reward curves with seed bands.

    python -m agents.plots runs/hepo/RUN_A runs/hepo/RUN_B ... --out runs/plots

Runs are grouped by their ``config.json`` algorithm; each group's curve is the mean over its runs (seeds)
of a ``metrics.jsonl`` column against env steps, with a band of +-1.96 standard errors over seeds (a
single run shows its own 95% CI columns when it has them).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from agents.runs import read_json, read_metrics  # noqa: E402

CURVES = ("eval/reward_per_session", "eval/gmv_per_session", "eval/ctcvr", "eval/cand_mean_value")
"""the metrics drawn by default, one panel each"""


def run_label(run: Path) -> str:
    cfg = run / "config.json"
    return read_json(cfg).get("algo", run.name) if cfg.is_file() else run.name


def _series(run: Path, metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r.get(metric) is not None]
    xs = np.array([r.get(x, r.get("iteration", 0)) for r in rows], dtype=float)
    ys = np.array([r[metric] for r in rows], dtype=float)
    lo = f"{metric}_ci_low"
    band = np.array([[r[lo], r[f"{metric}_ci_high"]] for r in rows], dtype=float) if rows and lo in rows[0] else None
    return xs, ys, band


def plot_curves(runs: list[Path], path: Path, metrics: tuple[str, ...] = CURVES, x: str = "env_steps") -> Path:
    """One panel per metric, one line per algorithm (mean over its runs), seed band; saved to ``path``."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        groups[run_label(Path(run))].append(Path(run))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, members in sorted(groups.items()):
            series = [_series(r, metric, x) for r in members]
            series = [s for s in series if s[0].size]
            if not series:
                continue
            n = min(s[0].size for s in series)
            xs = series[0][0][:n]
            ys = np.stack([s[1][:n] for s in series])
            mean = ys.mean(0)
            line = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(series)})")[0]
            if len(series) > 1:
                half = 1.96 * ys.std(0, ddof=1) / np.sqrt(len(series))
                ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.2)
            elif series[0][2] is not None:
                ax.fill_between(xs, series[0][2][:n, 0], series[0][2][:n, 1], color=line.get_color(), alpha=0.2)
        ax.set_title(metric.split("/", 1)[-1])
        ax.set_xlabel(x.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (agents.hepo output)")
    parser.add_argument("--out", default="runs/plots", help="output folder")
    ns = parser.parse_args(argv)
    missing = [r for r in ns.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"not run folders (no metrics.jsonl): {', '.join(missing)}")
    path = plot_curves([Path(r) for r in ns.runs], Path(ns.out) / "curves.png")
    print(path)
    return path


if __name__ == "__main__":
    main()
