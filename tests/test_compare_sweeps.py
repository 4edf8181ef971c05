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


def test_bad_variant_arguments_fail_with_one_line(tmp_path):
    root = _sweep(tmp_path / "s", {"a": [0.1, 0.2], "b": [0.2, 0.1]}, [0.1, 0.1])
    with pytest.raises(SystemExit, match="needs --variants"):
        compare.main([str(root)])
    with pytest.raises(SystemExit, match="holds no variant 'c'"):
        compare.main([str(root), "--variants", "a,c"])
    with pytest.raises(SystemExit, match="expected two variant names"):
        compare.main([str(root), "--variants", "a"])
