"""One learning-rate sweep for every RL learner on the same data and generator, then the selected runs compared.

    python -m agents.sweep --algos hepo,ppo,grpo,sibling_grpo,dpo --lrs 3e-5,1e-4,3e-4 --seeds 0,1 \
        --out runs/sweep [--variants "g8=--group-size 8;g40=--group-size 40"] -- --profile cpu --iterations 20

Grid (``agents.rl.sweep``): every variant x seed x algorithm x learning rate is one ``agents.hepo`` run
(``agents.rl.trainer.train`` in process, on the run's parsed flags) into ``OUT/VARIANT/ALGO/lr{LR}/seed{S}``, with
the ``agents.hepo`` flags after ``--`` (every run), then the variant's flags (``--variants NAME=FLAGS;...``,
parsed like a shell line, so a variant overrides a flag given after ``--``; default one variant ``base``
without flags) and ``--algo``, ``--lr``, ``--seed``, ``--out``, ``--pretrain-dir`` set by the sweep (giving
one of those five after ``--`` or in a variant is an error). Every
run of a seed starts from the same VAFT generator: ``--pretrain-dir OUT/pretrain/KEY/seed{S}``, where KEY is a
digest of the pre-training settings (the MTP and VAFT stage configs bar paths, device and seed, and the
funnel's log size), so variants that change only RL flags share one pre-training per seed and a variant that
changes pre-training (``--codebook-size``, ``--preset``...) gets its own; ``OUT/pretrain/KEY/settings.json``
says which. Every flag is checked before the first run: each variant's ``agents.hepo`` command line is parsed
once, and a planned folder that holds a run with other settings is refused. A run whose ``summary.json`` says
it finished (``--iterations`` reached, or its oracle_share plateau) is skipped; an interrupted one resumes
from its checkpoint exactly (``agents.hepo``'s own resume). One process runs the grid, one run at a time
(not under ``torchrun``; ``--device cuda`` after ``--`` puts every run on the GPU).

Selection (``select_lr``): per variant x algorithm, the learning rate with the highest mean over seeds of
``--select-metric`` at the run's LAST training-time evaluation (``agents.hepo --eval-seed``'s held-out
sessions), or with ``--policy best`` at the evaluation that chose ``RUN/best`` (the highest held-out reward per
session: what a platform would ship from a run whose learned reward is over-optimised); ties go to the smaller
learning rate. Final comparison (``evaluate_selected``): per variant and
seed, the selected run of every algorithm (``gpr:RUN``, or ``gpr:RUN/best``; beam ``--eval-beam``) and the ``--references`` (a
built-in policy, or ``learned-cascade``: the seed's pre-training platform, present with ``--behaviour
learned-cascade`` and skipped otherwise) are evaluated with ``agents.evaluation.folder.evaluate_folder`` on a
DIFFERENT reset seed (``--final-eval-seed``), so the numbers that compare the algorithms were not used to
pick their learning rate; paired by user across agents (per seed, ``OUT/VARIANT/final/seed{S}/paired.csv``).
The table then holds each metric's mean over seeds with its t interval, and the paired difference to
``--reference-algo`` over seeds (``gpr_sim.stats.paired_difference``).

The tables and the figure are ``agents.reporting.sweep`` (pure functions of the tables, tested without training).
Output (atomic writes): ``sweep.csv`` (one row per run: final metrics, iterations run, wall seconds of this
sweep's calls, ``wall.json``; a seed's first run includes its pre-training), ``selected.csv`` (per variant x algo x lr: select metric mean and t interval
over seeds, ``selected``), ``comparison.csv`` / ``comparison.md`` (the final evaluation, with
``final_eval_seed``), ``sweep.png`` (select metric vs lr, one line per algorithm, one panel per variant).

Sweeps: the small-preset CPU sweep (5 algorithms x 3 learning rates x 2 seeds, ``agents.hepo``'s cpu profile):

    python -m agents.sweep --out runs/sweep -- --profile cpu --threads 1 --no-progress

and a study of where per-level credit matters (smaller groups, another codebook size: ``--codebook-size``
changes pre-training, so that variant gets its own generators) as variants of the same grid:

    python -m agents.sweep --out runs/sweep_credit --algos hepo,grpo,sibling_grpo \
        --variants "g4=--group-size 4;g40=--group-size 40;cb8=--codebook-size 8" -- --profile cpu
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pandas as pd

from agents.cli import parse_args, run_main
from agents.reporting.sweep import comparison_markdown, format_selected, plot_sweep, select_lr
from agents.rl.sweep import SweepConfig, evaluate_selected, plan, run_grid, selected_runs, sweep_table
from gpr_sim.runs import atomic_write_bytes, write_json

Args = SweepConfig
"""CLI of ``python -m agents.sweep``: one flag per field; the ``agents.hepo`` flags of every run follow ``--``."""


def parse(argv: list[str] | None) -> Args:
    """``Args`` from the sweep's flags; the flags after the first ``--`` go to every ``agents.hepo`` run."""
    argv = list(argv or [])
    own, hepo_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    about = (
        __doc__.strip().splitlines()[0] + " Flags after -- go to every run (python -m agents.hepo --help)."
    )
    args = parse_args(Args, own, about, entry="agents.sweep")
    return dataclasses.replace(args, hepo_flags=tuple(hepo_flags)) if hepo_flags else args


def main(argv: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Run (or reuse) the grid, select each algorithm's lr, compare the selected runs on the final seed;
    returns the tables by name (sweep, selected, and with ``--final`` comparison)."""
    args = parse(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # every rank would write the tables and evaluations
        raise ValueError("agents.sweep runs as one process, not under torchrun: it trains one run at a time")
    out = Path(args.out)
    runs = plan(args)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep_config.json", dataclasses.asdict(args))
    wall = run_grid(args, runs)
    sweep = sweep_table(runs, wall, args.select_metric, args.policy)
    atomic_write_bytes(out / "sweep.csv", sweep.to_csv(index=False).encode())
    selected = select_lr(sweep, args.select_metric, args.level)
    atomic_write_bytes(out / "selected.csv", selected.to_csv(index=False).encode())
    plot_sweep(selected, args.select_metric, out / "sweep.png", args.level)
    print(format_selected(selected, args.select_metric, args.level))
    tables = {"sweep": sweep, "selected": selected}
    if args.final:
        comparison = evaluate_selected(args, selected_runs(runs, selected))
        atomic_write_bytes(out / "comparison.csv", comparison.to_csv(index=False).encode())
        md = comparison_markdown(comparison, args.reference_algo, args.level)
        atomic_write_bytes(out / "comparison.md", md.encode())
        print("\n" + md)
        tables["comparison"] = comparison
    print(
        f"[sweep] {out}/: sweep.csv, selected.csv, sweep.png"
        + (", comparison.csv, comparison.md" if args.final else "")
    )
    return tables


if __name__ == "__main__":
    run_main(main)
