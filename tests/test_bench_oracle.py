"""benchmarks/bench_oracle.py runs end to end on a small world: every row, the JSON, the same top-K as the
per-row path (the speed itself lives in benchmarks/RESULTS.md, not here)."""

import json

from benchmarks.bench_oracle import main


def test_bench_oracle_writes_every_row_and_the_same_choices(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--preset", "small", "--rows", "4", "--repeats", "1", "--cells", "8192", "--out", str(out)])
    record = json.loads(out.read_text())
    modes = [r["mode"] for r in record["rows"]]
    assert (
        modes
        == [r["mode"] for r in rows]
        == [
            "per-row",
            "shared",
            "shared, compiled",
            "shared, 8,192 pairs a chunk",
            "shared, compiled, 8,192 pairs a chunk",
        ]
    )
    assert record["compiled"] and all(v == 1.0 for v in record["same_actions"].values())
    assert all(r["seconds"] > 0 and 0 < r["floor_fraction"] for r in record["rows"])
