"""Re-evaluate the final policies of ``agents.hepo`` runs on many held-out sessions, beside the cascade.

    python benchmarks/reevaluate.py runs/compare/{hepo,ppo,grpo}/seed* --sessions 8192 --num-envs 1024 --jobs 2

Why: the held-out Evaluator of ``agents.hepo`` (``agents.evaluation.heldout``) runs 256 sessions (a CPU-sized
default), which hold about 8 conversions: GMV and CTCVR differences between policies are noise at that size
(``benchmarks/RESULTS.md``).
This script runs every run's ``policy.pt`` (as ``gpr:RUN`` in ``agents.evaluate``) and the cascade on a fresh,
larger set of sessions, the same for every agent (one reset seed), in ``--jobs`` processes of one torch
thread each, then tabulates per label (``agents.reporting.folders.run_label``):

- the mean over seeds with a t interval over seeds (what another training seed would give);
- the mean over seeds of each run's own session CI half-width (what the evaluation size still contributes);
- the change vs ``--ref`` paired by seed (``x / x_ref - 1`` per seed, t interval over seeds);
- the change vs ``cascade-privileged`` (``gpr_sim.stats.relative_change``: seed spread and its session CI), a
  labelled reference: it reads the simulator's hidden state.

Writes ``OUT/table.md`` and ``OUT/table.json``; the ``agents.evaluate`` folders are ``OUT/eval{j}`` (a rerun
with the same settings reuses their sessions).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from agents.reporting.folders import check_runs, group_runs  # noqa: E402
from agents.reporting.keys import BASELINE, BASELINE_NOTE, TABLE4  # noqa: E402
from agents.reporting.tables import change_cell, estimate_cell  # noqa: E402
from gpr_sim.runs import atomic_write_bytes, read_json  # noqa: E402
from gpr_sim.stats import CI_SUFFIXES, relative_change, t_interval  # noqa: E402


def run_evaluations(specs: list[str], args, out: Path) -> dict[str, dict]:
    """``agents.evaluate`` over ``specs`` split round-robin into ``args.jobs`` processes -> spec -> summary row."""
    jobs = [specs[j :: args.jobs] for j in range(min(args.jobs, len(specs)))]
    procs = []
    for j, part in enumerate(jobs):
        cmd = [
            sys.executable,
            "-m",
            "agents.evaluate",
            "--agents",
            ",".join(part),
            "--num-envs",
            str(args.num_envs),
            "--sessions",
            str(args.sessions),
            "--seed",
            str(args.seed),
            "--preset",
            args.preset,
            "--threads",
            "1",
            "--level",
            str(args.level),
            "--no-plots",
            "--out",
            str(out / f"eval{j}"),
        ]
        log = open(out / f"eval{j}.log", "w")  # noqa: SIM115  (closed below, after the process ends)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, cmd))
    failed = []
    for proc, log, cmd in procs:
        if proc.wait() != 0:
            failed.append(f"{' '.join(cmd)} (log: {log.name})")
        log.close()
    if failed:
        raise SystemExit("agents.evaluate failed:\n  " + "\n  ".join(failed))
    rows: dict[str, dict] = {}
    for j in range(len(jobs)):
        rows.update(read_json(out / f"eval{j}" / "summary.json"))
    return rows


def _num(v) -> float:
    """A summary value (None where ``agents.evaluate`` had none) as a float."""
    return math.nan if v is None else float(v)


def tabulate(groups: dict[str, list[Path]], rows: dict[str, dict], ref: str, level: float) -> list[dict]:
    """One record per label: per metric the seed mean and interval, session half-width, vs ref, vs baseline."""
    cascade = rows[BASELINE]
    by_seed = {
        label: {read_json(run / "config.json")["seed"]: rows[f"gpr:{run}"] for run in runs}
        for label, runs in groups.items()
    }
    out = [
        {
            "label": BASELINE,
            "n": None,
            **{f"{m}{s}": _num(cascade.get(f"eval/{m}{s}")) for m in TABLE4 for s in CI_SUFFIXES},
        }
    ]
    for label, seeds in by_seed.items():
        rec: dict = {"label": label, "n": len(seeds), "seeds": sorted(seeds)}
        for m in TABLE4:
            x = np.array([seeds[s][f"eval/{m}"] for s in sorted(seeds)], dtype=np.float64)
            half = [(seeds[s][f"eval/{m}_ci_high"] - seeds[s][f"eval/{m}_ci_low"]) / 2 for s in sorted(seeds)]
            rec.update(t_interval(x, level, nan_policy="propagate").columns(m))
            rec[f"{m}_per_seed"] = x.tolist()
            rec[f"{m}_session_half"] = float(np.mean(half))
            common = sorted(set(seeds) & set(by_seed.get(ref, {})))
            if label != ref and len(common) > 0:
                d = [seeds[s][f"eval/{m}"] / by_seed[ref][s][f"eval/{m}"] - 1 for s in common]
                rec.update(t_interval(d, level, nan_policy="propagate").columns(f"{m}_vs_ref"))
            c = [_num(cascade.get(f"eval/{m}{s}")) for s in CI_SUFFIXES]
            r = relative_change(x, *c, ref_level=level, level=level, nan_policy="propagate")
            rec.update(r.columns(f"{m}_vs_{BASELINE}"))
        out.append(rec)
    return out


def _change(r: dict, key: str) -> str:
    return change_cell(r, key, "+.1%", "n/a")


def to_markdown(table: list[dict], ref: str, args) -> str:
    head = "| label | n | " + " | ".join(TABLE4) + " |\n|" + "---|" * (len(TABLE4) + 2) + "\n"
    lines = [
        f"{args.sessions} sessions per agent (reset seed {args.seed}, {args.num_envs} slots); mean over seeds "
        f"[{args.level:.0%} t interval over seeds]; {BASELINE} ({BASELINE_NOTE}): CI over its sessions\n\n",
        head,
    ]
    lines += [
        f"| {r['label']} | {r['n'] or ''} | " + " | ".join(estimate_cell(r, m) for m in TABLE4) + " |\n"
        for r in table
    ]
    lines += ["\nmean session-CI half-width of one run (the evaluation's own noise)\n\n", head]
    lines += [
        f"| {r['label']} | {r['n']} | " + " | ".join(f"{r[f'{m}_session_half']:.3g}" for m in TABLE4) + " |\n"
        for r in table[1:]
    ]
    lines += [f"\nchange vs {ref}, paired by seed\n\n", head]
    lines += [
        f"| {r['label']} | {r['n']} | " + " | ".join(_change(r, f"{m}_vs_ref") for m in TABLE4) + " |\n"
        for r in table[1:]
        if r["label"] != ref
    ]
    lines += [f"\nchange vs {BASELINE} (seed spread and the {BASELINE}'s session CI)\n\n", head]
    lines += [
        f"| {r['label']} | {r['n']} | "
        + " | ".join(_change(r, f"{m}_vs_{BASELINE}") for m in TABLE4)
        + " |\n"
        for r in table[1:]
    ]
    return "".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="agents.hepo run folders (each with policy.pt and config.json)")
    p.add_argument("--sessions", type=int, default=8192, help="completed sessions per agent")
    p.add_argument("--num-envs", type=int, default=1024, help="parallel session slots of each evaluation")
    p.add_argument("--seed", type=int, default=2026, help="reset seed (the same first users for every agent)")
    p.add_argument("--preset", default="small", help="world preset (the runs' own)")
    p.add_argument("--jobs", type=int, default=2, help="agents.evaluate processes at a time")
    p.add_argument("--ref", default="ppo", help="label the paired change is against")
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--out", default="runs/reevaluate")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.num_envs < 1 or args.jobs < 1:
        raise SystemExit("--sessions, --num-envs and --jobs must be >= 1")
    runs = check_runs(args.runs)
    missing = [str(r) for r in runs if not (r / "policy.pt").is_file()]
    if missing:
        raise SystemExit(f"no policy.pt in: {', '.join(missing)} (finished agents.hepo runs write one)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_evaluations([BASELINE] + [f"gpr:{r}" for r in runs], args, out)
    table = tabulate(group_runs(runs), rows, args.ref, args.level)
    md = to_markdown(table, args.ref, args)
    atomic_write_bytes(out / "table.md", md.encode())
    atomic_write_bytes(out / "table.json", json.dumps({"args": vars(args), "rows": table}, indent=2).encode())
    print(md)
    return table


if __name__ == "__main__":
    run_main(main)
