"""Every table and figure of a set of ``agents.hepo`` runs, written into one folder (``python -m agents.plots``).

| file | what |
|---|---|
| ``curves.png`` | one panel per metric, one line per algorithm (mean over seeds) against env steps, band: the same t interval over seeds as the tables |
| ``table3.csv`` / ``.md`` | GPR Table 3 analogue: candidate quality (nDCG, OPR, mean / max / top-1 normalised value of the top-K beam) at the last evaluation, per algorithm, and the VAFT generator they all start from (their iteration-0 evaluation), with the paper's numbers alongside, then each stage minus the VAFT generator it started from, paired by seed |
| ``final_table.csv`` / ``.md`` | per algorithm: final eval reward, GMV, CTCVR and revenue per session |
| ``table4.csv`` / ``.md`` | GPR Table 4 analogue: online CTR, CVR, CTCVR, GMV, costs (revenue) and reward per stage, the relative change of each stage vs the previous one (paired by seed) and, with ``baseline`` (an ``agents.evaluate`` folder), vs the privileged cascade (``cascade-privileged``, a labelled reference) |
| ``table5.csv`` / ``.md`` | GPR Table 5 analogue: Table 4's metrics per stage within each user-activity tier (1..5) and for new / old ads, with the privileged cascade's strata from ``baseline``; only when the runs' evaluations log strata (``agents.reporting.keys.strata_key``) |
| ``final.png`` | the final table as bars with error bars |
| ``reward_model.png`` | the reward model's monitor per iteration: the sampled candidates' value as rewarded and under the simulator's truth, and their correlation (``figures.plot_reward_model``); only when the runs log it |
| ``gradients.png`` | the update's policy and critic gradient norms before the clip and the share of minibatches it scaled (``figures.plot_gradients``); only when the runs log them |
"""

from __future__ import annotations

import warnings
from pathlib import Path

from agents.reporting.figures import plot_curves, plot_gradients, plot_reward_model, plot_table
from agents.reporting.folders import check_runs, runs_without_strata
from agents.reporting.keys import FINAL
from agents.reporting.tables import (
    final_table,
    table3,
    table3_markdown,
    table4,
    table4_markdown,
    table5,
    table5_markdown,
    to_markdown,
)
from gpr_sim.runs import atomic_write_bytes


def write_report(
    runs: list[str | Path],
    out: str | Path,
    level: float = 0.95,
    baseline: str | Path | None = None,
    policy: str = "last",
) -> dict[str, Path]:
    """Every file of the module docstring into ``out`` (``baseline``: see ``agents.reporting.tables.table4``;
    ``policy``: each run's last evaluation in the tables, or the one its best policy was chosen at); returns
    name -> path.

    ``table5`` only when every run logs strata; when only some do, it is left out with a warning."""
    runs, out = check_runs(runs), Path(out)
    t3, fin = table3(runs, level, policy), final_table(runs, level, policy=policy)
    t4 = table4(runs, baseline, level, policy)
    files = {"curves": plot_curves(runs, out / "curves.png", level=level)}
    monitor = plot_reward_model(runs, out / "reward_model.png", level=level)
    if monitor is not None:
        files["reward_model"] = monitor
    gradients = plot_gradients(runs, out / "gradients.png", level=level)
    if gradients is not None:
        files["gradients"] = gradients
    for name, table, markdown in (
        ("table3", t3, table3_markdown(t3, level)),
        ("final_table", fin, to_markdown(fin, FINAL, level)),
        ("table4", t4, table4_markdown(t4, level)),
    ):
        files[f"{name}.csv"] = atomic_write_bytes(out / f"{name}.csv", table.to_csv(index=False).encode())
        files[f"{name}.md"] = atomic_write_bytes(out / f"{name}.md", markdown.encode())
    missing = runs_without_strata(runs)
    if not missing:
        t5 = table5(runs, baseline, level, policy)
        files["table5.csv"] = atomic_write_bytes(out / "table5.csv", t5.to_csv(index=False).encode())
        files["table5.md"] = atomic_write_bytes(out / "table5.md", table5_markdown(t5, level).encode())
    elif len(missing) < len(runs):
        warnings.warn(
            f"table5 not written: no per-stratum evaluations in {', '.join(map(str, missing))} "
            "(run folders from before agents.hepo logged them)",
            stacklevel=2,
        )
    files["final"] = plot_table(fin, out / "final.png", FINAL, level)
    return files
