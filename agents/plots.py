"""Plots and tables from run folders: reward curves with seed bands, the Table 3, 4 and 5 analogues, final metrics.

    python -m agents.plots runs/hepo/RUN_A runs/hepo/RUN_B ... --out runs/plots [--baseline runs/eval/BASE] \
        [--policy best]

Given ``agents.hepo`` run folders (several algorithms and seeds), writes into ``--out`` ``curves.png``,
``table3``, ``final_table``, ``table4`` and (when the runs log strata) ``table5`` as ``.csv`` and ``.md``,
and ``final.png`` (``agents.reporting.report.write_report`` lists them), and prints the markdown tables.

Runs are grouped by their ``config.json`` label (else algorithm). Every table value is the mean over the
group's runs (seeds) with a two-sided Student t interval over seeds (``agents.reporting.tables``); with
``--baseline`` (an ``agents.evaluate`` folder with a ``cascade-privileged`` row, on the runs' held-out sessions)
Tables 4 and 5 compare every stage with that privileged reference (an older folder's ``cascade`` row too).
With ``--policy best`` the tables report each run at the evaluation its best policy (``RUN/best``, the highest
held-out reward per session) was chosen at, instead of its last: what a run whose learned reward is
over-optimised would ship; the ``iteration`` column says which (the earliest over the group's seeds).
``agents.reporting.tables.pretrain_table`` and
``agents.reporting.figures.plot_pretrain`` do the same for ``agents.pretrain`` folders (MTP, VAFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from agents.cli import parse_args as parse_cli
from agents.cli import run_main
from agents.reporting.report import write_report
from gpr_sim.stats import check_level


@dataclass(frozen=True)
class Args:
    """CLI of ``python -m agents.plots`` (the run folders are positional)."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders (agents.hepo output)"""
    out: str = "runs/plots"
    """output folder"""
    level: float = 0.95
    """coverage of the t intervals over seeds"""
    baseline: str | None = None
    """agents.evaluate folder with a cascade-privileged row (Tables 4, 5)"""
    policy: Literal["last", "best"] = "last"
    """each run's evaluation in the tables: its last, or the one its best policy (RUN/best) was chosen at"""

    def __post_init__(self) -> None:
        if isinstance(self.runs, str) or not self.runs:
            raise ValueError(f"runs={self.runs!r} is invalid: expected one or more run folders")
        check_level(self.level)  # a coverage strictly inside (0, 1): NaN and inf fail too


def parse_args(argv: list[str] | None = None) -> Args:
    """``Args`` from the command line: the run folders, then one ``--flag`` per other field."""
    return parse_cli(Args, argv, __doc__)


def main(argv: list[str] | Args | None = None) -> dict[str, Path]:
    """Write the report of the run folders; returns file name -> path (also prints the markdown tables)."""
    args = argv if isinstance(argv, Args) else parse_args(argv)
    files = write_report(
        list(args.runs), args.out, args.level, args.baseline, args.policy
    )  # a bad folder: one-line ValueError
    for name in ("table3.md", "final_table.md", "table4.md", "table5.md"):
        if name in files:
            print(files[name].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return files


if __name__ == "__main__":
    run_main(main)
