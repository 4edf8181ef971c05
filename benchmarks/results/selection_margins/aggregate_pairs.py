"""The two best-checkpoint rules' policies on other sessions: resolved minus highest, per run and over runs.

    python benchmarks/results/selection_margins/aggregate_pairs.py      # after eval_pairs.sh

Reads ``runs/margin`` and ``runs/margin_resolved`` (each run's ``summary.json``: the iteration its rule kept) and
``runs/margin_eval/ALGO_sS/paired.csv`` (``agents.evaluate``, 2,048 sessions of reset seed 54321, paired by user);
a run whose two rules kept the same iteration serves the same policy: difference 0. Writes
``resolved_vs_highest.csv`` beside this file and prints the t intervals over runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[3]
METRICS = ("reward_per_session", "revenue_per_session", "gmv_per_session", "ctcvr", "oracle_share")


def kept(folder: Path) -> int:
    return json.loads((folder / "summary.json").read_text())["best"]["iteration"]


def t_cell(x) -> str:
    x = np.asarray(x, float)
    m, h = x.mean(), stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] (n={len(x)})"


rows = []
for algo in ("hepo", "ppo", "grpo"):
    for seed in range(5):
        name = f"{algo}_s{seed}"
        row = {"algo": algo, "seed": seed}
        row["highest"], row["resolved"] = (
            kept(ROOT / "runs" / d / name) for d in ("margin", "margin_resolved")
        )
        if row["highest"] != row["resolved"]:
            paired = pd.read_csv(ROOT / "runs" / "margin_eval" / name / "paired.csv").set_index("metric")
            for m in METRICS:
                row.update({m: paired.loc[m, "difference"], f"{m}_ci_low": paired.loc[m, "ci_low"]})
                row.update(
                    {
                        f"{m}_ci_high": paired.loc[m, "ci_high"],
                        f"{m}_highest": paired.loc[m, "reference_value"],
                    }
                )
        else:
            row.update({m: 0.0 for m in METRICS})
        rows.append(row)
table = pd.DataFrame(rows)
table.to_csv(Path(__file__).with_name("resolved_vs_highest.csv"), index=False)
differ = table[table["highest"] != table["resolved"]]
for m in METRICS:
    print(f"{m}: all runs {t_cell(table[m])}; runs whose rules differ {t_cell(differ[m])}")
for algo in ("hepo", "ppo", "grpo"):
    print(f"{algo} reward_per_session: {t_cell(table[table['algo'] == algo]['reward_per_session'])}")
