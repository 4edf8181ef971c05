"""benchmarks/compare_sweeps.py: two sweeps, or two variants of one sweep, compared run by run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_sweeps.py"
_spec = importlib.util.spec_from_file_location("compare_sweeps", _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

METRICS = compare.METRICS


def _sweep(root: Path, finals: dict[str, list[float]], start: list[float]) -> Path:
    """A finished sweep folder: per variant one HEPO run per seed whose every metric ends at ``finals[variant]``
    [seed] and starts (iteration 0, shared by the seed's variants) at ``start[seed]``."""
    rows = []
    for variant, values in finals.items():
        for seed, value in enumerate(values):
            run = root / variant / "hepo" / "lr0.0001" / f"seed{seed}"
            run.mkdir(parents=True)
            first = {"iteration": 0, **{m: start[seed] for m in METRICS}}
            (run / "metrics.jsonl").write_text(json.dumps(first) + "\n")
            rows.append(
                {"variant": variant, "algo": "hepo", "lr": 1e-4, "seed": seed, **{m: value for m in METRICS}}
            )
    pd.DataFrame(rows).to_csv(root / "sweep.csv", index=False)
    return root


def test_two_variants_of_one_sweep_are_paired_by_seed(tmp_path):
    """Variant A of a sweep against its variant B: the pairs are the seeds, the differences A - B, and the start
    rows are the seeds' shared VAFT evaluation (difference 0)."""
    root = _sweep(tmp_path / "s", {"priv": [0.5, 0.6, 0.7], "learned": [0.2, 0.4, 0.3]}, [0.4, 0.4, 0.5])
    res = compare.main([str(root), "--variants", "priv,learned"])
    assert res["names"] == ("priv", "learned")
    end = next(r for r in res["end"] if r["metric"] == METRICS[0] and r["rows"] == "all")
    assert end["pairs"] == 3 and end["diff"] == pytest.approx((0.3 + 0.2 + 0.4) / 3) and end["a_wins"] == 3
    assert end["diff_low"] < end["diff"] < end["diff_high"]
    start = next(r for r in res["start"] if r["metric"] == METRICS[0] and r["rows"] == "all")
    assert start["pairs"] == 3 and start["diff"] == pytest.approx(0.0)


def test_final_comparisons_of_two_sweeps_are_paired_by_run(tmp_path):
    """Both sweeps' final evaluations (one ``summary.csv`` per variant and seed, the algorithm's row named by its
    run folder, last or ``best``; reference rows ignored) are paired on (variant, algo, lr, seed)."""
    roots = [_sweep(tmp_path / n, {"v": [0.3, 0.3]}, [0.2, 0.2]) for n in ("last", "best")]
    for root, sub, values in ((roots[0], "", [0.25, 0.35]), (roots[1], "/best", [0.45, 0.50])):
        for seed, value in enumerate(values):
            folder = root / "v" / "final" / f"seed{seed}"
            folder.mkdir(parents=True)
            spec = f"gpr:{root}/v/hepo/lr0.0001/seed{seed}{sub}@beam_width=2"
            agents = [
                {"agent": spec, **{m: value for m in METRICS}},
                {"agent": "cascade-privileged"} | dict.fromkeys(METRICS, 9.0),
            ]
            pd.DataFrame(agents).to_csv(folder / "summary.csv", index=False)
    res = compare.main([str(roots[1]), str(roots[0]), "--names", "best,last"])
    final = next(r for r in res["final"] if r["metric"] == METRICS[0] and r["rows"] == "all")
    assert final["pairs"] == 2 and final["diff"] == pytest.approx(((0.45 - 0.25) + (0.50 - 0.35)) / 2)
    assert final["best"] == pytest.approx(0.475) and final["a_wins"] == 2
    assert "final" not in compare.main(
        [str(roots[0]), str(_sweep(tmp_path / "none", {"v": [0.1, 0.1]}, [0.2, 0.2]))]
    )


def test_each_algorithm_gets_its_own_rows(tmp_path):
    """With several learners in the grid the A/B is also paired per algorithm (does it move one more than another)."""
    root = _sweep(tmp_path / "s", {"a": [0.5, 0.6], "b": [0.2, 0.4]}, [0.1, 0.1])
    sweep = pd.read_csv(root / "sweep.csv")
    grpo = sweep.assign(algo="grpo", **{m: sweep[METRICS[0]] + (sweep["variant"] == "a") for m in METRICS})
    pd.concat([sweep, grpo]).to_csv(root / "sweep.csv", index=False)
    res = compare.main([str(root), "--variants", "a,b"])
    rows = {r["rows"]: r for r in res["end"] if r["metric"] == METRICS[0]}
    assert list(rows) == ["all", "algo hepo", "algo grpo", "seed 0", "seed 1"]
    assert rows["algo hepo"]["diff"] == pytest.approx(0.25) and rows["algo grpo"]["diff"] == pytest.approx(
        1.25
    )
    assert rows["all"]["pairs"] == 4 and rows["seed 0"]["pairs"] == 2


def test_bad_variant_arguments_fail_with_one_line(tmp_path):
    root = _sweep(tmp_path / "s", {"a": [0.1, 0.2], "b": [0.2, 0.1]}, [0.1, 0.1])
    with pytest.raises(SystemExit, match="needs --variants"):
        compare.main([str(root)])
    with pytest.raises(SystemExit, match="holds no variant 'c'"):
        compare.main([str(root), "--variants", "a,c"])
    with pytest.raises(SystemExit, match="expected two variant names"):
        compare.main([str(root), "--variants", "a"])
