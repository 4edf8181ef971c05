"""Two ``agents.sweep`` folders run with one setting changed (an A/B of a flag), compared run by run.

    python benchmarks/compare_sweeps.py runs/sweep_small runs/sweep_small_nomkt --names market,no-market
    python benchmarks/compare_sweeps.py runs/sweep_reward --variants privileged,learned   # two variants of one

Both sweeps must hold the same grid (variant, algo, lr, seed); with ``--variants A,B`` the runs of variant A
of the first sweep are matched with those of variant B of the second (the first again when only one is given)
on (algo, lr, seed): the A/B of a flag run as variants of one grid, which share their pre-training per seed.
Every cell of the grid is one pair: the same seed, algorithm and learning rate trained once under each setting. For the start of RL (the VAFT generator's
iteration-0 evaluation, one per seed) and the end of RL (each run's last training-time evaluation) it prints,
per metric, each setting's mean and the paired difference A - B with a t interval over the pairs, and the
same per seed (pairs of one seed share their pre-training, so they are not independent: read the per-seed rows
before the pooled one), and per algorithm when the grid has several. When both sweeps ran their final comparison (``VARIANT/final/seed{S}/summary.csv``, on
``--final-eval-seed``'s sessions), the same for the final evaluation of each run's compared policy (its last or,
``agents.sweep --policy best``, its ``best/``): the number that was not used to choose anything. Writes ``--out``
(JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from gpr_sim.runs import write_json
from gpr_sim.stats import paired_difference, t_interval

KEYS = ["variant", "algo", "lr", "seed"]
METRICS = ("eval/oracle_share", "eval/reward_per_session", "eval/gmv_per_session", "eval/ctcvr")


def start_rows(folder: Path) -> pd.DataFrame:
    """(variant, seed) -> the iteration-0 evaluation of the sweep's runs (the VAFT generator; the first run
    of each seed found, every run of a seed starts from the same model)."""
    rows = []
    for metrics in sorted(folder.glob("*/*/lr*/seed*/metrics.jsonl")):
        first = json.loads(metrics.read_text().splitlines()[0])
        variant, seed = metrics.parts[-5], int(metrics.parts[-2].removeprefix("seed"))
        rows.append({"variant": variant, "seed": seed, **{m: first.get(m) for m in METRICS}})
    return pd.DataFrame(rows).drop_duplicates(["variant", "seed"])


RUN_IN_SPEC = re.compile(r"^gpr:.*/([^/]+)/lr([^/]+)/seed(\d+)(?:/best)?(?:@.*)?$")
"""an algorithm's row of a sweep's final comparison: ``gpr:OUT/VARIANT/ALGO/lrLR/seedS[/best][@options]``"""


def final_rows(folder: Path) -> pd.DataFrame:
    """(variant, algo, lr, seed) -> the final comparison's metrics of that run's policy (``agents.sweep``'s
    ``evaluate_selected``: one ``agents.evaluate`` folder per variant and seed); empty when it did not run."""
    rows = []
    for summary in sorted(folder.glob("*/final/seed*/summary.csv")):
        variant = summary.parts[-4]
        for r in pd.read_csv(summary).to_dict("records"):
            match = RUN_IN_SPEC.match(str(r["agent"]))
            if match:
                algo, lr, seed = match.groups()
                rows.append(
                    {"variant": variant, "algo": algo, "lr": float(lr), "seed": int(seed)}
                    | {m: r.get(m) for m in METRICS}
                )
    return pd.DataFrame(rows, columns=[*KEYS, *METRICS])


def paired(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], names: tuple[str, str]) -> list[dict]:
    """Per metric: means, paired difference a - b over the matched rows (all, then per algorithm when the grid has
    several, then per seed)."""
    both = a.merge(b, on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise ValueError(f"the sweeps hold different grids: {len(a)} and {len(b)} rows, {len(both)} matched")
    out = []
    groups = [("all", both)]
    if "algo" in both and both["algo"].nunique() > 1:  # does the A/B move one learner more than another?
        groups += [(f"algo {a}", g) for a, g in both.groupby("algo", sort=False)]
    groups += [(f"seed {s}", g) for s, g in both.groupby("seed")]
    for metric in METRICS:
        for label, g in groups:
            x, y = g[f"{metric}_a"].to_numpy(float), g[f"{metric}_b"].to_numpy(float)
            d = paired_difference(x, y)
            out.append(
                {
                    "metric": metric,
                    "rows": label,
                    "pairs": len(g),
                    names[0]: t_interval(x).value,
                    names[1]: t_interval(y).value,
                    "diff": d.value,
                    "diff_low": d.ci_low,
                    "diff_high": d.ci_high,
                    "a_wins": int((x > y).sum()),
                }
            )
    return out


def table(rows: list[dict], names: tuple[str, str], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"| metric | rows | pairs | {names[0]} | {names[1]} | {names[0]} - {names[1]} [95% t] | {names[0]} higher |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['metric']} | {r['rows']} | {r['pairs']} | {r[names[0]]:.3f} | {r[names[1]]:.3f} | "
            f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] | {r['a_wins']}/{r['pairs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="the first sweep's --out")
    p.add_argument(
        "b", type=Path, nargs="?", default=None, help="the second sweep's --out (default: the first)"
    )
    p.add_argument(
        "--names", default="", help="labels of the two settings, comma-separated (default a,b or A,B)"
    )
    p.add_argument(
        "--variants", default="", help="A,B: variant A of the first sweep against variant B of the second"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON of both tables")
    args = p.parse_args(argv)
    b = args.a if args.b is None else args.b
    variants = tuple(x for x in args.variants.split(",") if x)
    same_variant = len(set(variants)) == 1 and b == args.a  # a variant of one sweep against itself
    if args.variants and (len(variants) != 2 or same_variant):
        raise SystemExit(f"error: --variants {args.variants!r} is invalid: expected two variant names A,B")
    if not variants and b == args.a:
        raise SystemExit("error: comparing a sweep with itself needs --variants A,B")
    names = tuple((args.names or (",".join(variants) if variants else "a,b")).split(","))
    if len(names) != 2 or len(set(names)) != 2:
        raise SystemExit(f"error: --names {args.names!r} is invalid: expected two different labels")
    for folder in (args.a, b):
        if not (folder / "sweep.csv").is_file():
            raise SystemExit(f"error: {folder} holds no sweep.csv: not a finished agents.sweep folder")
    runs = [pd.read_csv(f / "sweep.csv") for f in (args.a, b)]
    starts = [start_rows(f) for f in (args.a, b)]
    finals = [final_rows(f) for f in (args.a, b)]
    keys, start_keys = KEYS, ["variant", "seed"]
    if variants:  # one variant of each side, matched on the rest of the grid
        for folder, frame, variant in zip((args.a, b), runs, variants):
            if variant not in set(frame["variant"]):
                raise SystemExit(f"error: --variants: {folder} holds no variant {variant!r}")
        runs = [f[f["variant"] == v].drop(columns="variant") for f, v in zip(runs, variants)]
        starts = [f[f["variant"] == v].drop(columns="variant") for f, v in zip(starts, variants)]
        finals = [f[f["variant"] == v].drop(columns="variant") for f, v in zip(finals, variants)]
        keys, start_keys = [k for k in KEYS if k != "variant"], ["seed"]
    end = paired(*runs, keys, names)
    start = paired(*starts, start_keys, names)
    print(table(start, names, "start of RL (VAFT, iteration 0), per seed"))
    print()
    print(table(end, names, "end of RL (last training-time evaluation), per (algo, lr, seed)"))
    res = {"a": str(args.a), "b": str(b), "variants": variants, "names": names, "start": start, "end": end}
    if all(len(f) for f in finals):
        res["final"] = paired(*finals, keys, names)
        print()
        print(
            table(
                res["final"], names, "final comparison (the sweeps' --final-eval-seed), per (algo, lr, seed)"
            )
        )
    if args.out:
        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
