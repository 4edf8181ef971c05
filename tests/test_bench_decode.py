"""benchmarks/bench_decode.py runs end to end on CPU with tiny sizes and writes the documented JSON."""

import importlib.util
import json
import math
from pathlib import Path

from gpr_sim.model import GPRConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
_spec = importlib.util.spec_from_file_location("bench_decode", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
beam_widths, decode_cost, main = bench.beam_widths, bench.decode_cost, bench.main

TINY_ARGS = [
    "--device", "cpu", "--sizes", "6,10", "--beams", "2,4", "--top-k", "3", "--seq-len", "12",
    "--items", "500", "--levels", "6,5,4", "--d-model", "32", "--n-layers", "2", "--n-heads", "2",
    "--chunk", "4", "--naive-requests", "2", "--train-batch", "3", "--train-steps", "1",
]  # fmt: skip


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_main_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    main([*TINY_ARGS, "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("device", "torch", "date", "command", "args", "config", "matmul_flops_per_s", "copy_bytes_per_s",
                "naive_decisions_per_s", "rows", "train", "ffn_impls"):  # fmt: skip
        assert key in res, key
    assert _positive(res["matmul_flops_per_s"]) and _positive(res["copy_bytes_per_s"])
    assert set(res["naive_decisions_per_s"]) == {"2", "4"}
    rows = res["rows"]
    assert [(r["mode"], r["n"], r["beam"]) for r in rows] == [
        ("eager", n, w) for n in (6, 10) for w in (2, 4)
    ]
    for r in rows:
        assert "error" not in r, r
        for key in ("decisions_per_s", "seconds", "flops_per_decision", "flops_min_per_decision",
                    "bytes_per_decision", "floor_decisions_per_s", "frac_of_floor", "naive_decisions_per_s",
                    "x_naive", "achieved_flops_per_s"):  # fmt: skip
            assert _positive(r[key]), (key, r)
        assert r["chunk"] == 4 and r["top_k"] == min(3, r["beam"])
        assert r["peak_gib"] is None  # CPU: no per-run peak
        assert r["flops_min_per_decision"] <= r["flops_per_decision"]
    assert _positive(res["train"]["tokens_per_s"])
    impls = {f["impl"]: f for f in res["ffn_impls"]}
    assert set(impls) == {"loop", "chunked", "grouped"}
    assert _positive(impls["chunked"]["ms"]) and impls["chunked"]["max_abs_diff_vs_loop"] < 1e-4


def test_cost_model_counts():
    assert beam_widths((64, 64, 64), 40) == [1, 40, 40]
    assert beam_widths((2, 3, 4), 40) == [1, 2, 6]
    cfg = GPRConfig(level_sizes=(8, 8, 8), d_model=32, n_layers=2, n_heads=2)
    a, b = decode_cost(cfg, 16, 4, 8, 4), decode_cost(cfg, 16, 8, 8, 4)
    assert b["flops"] > a["flops"] > 0 and b["bytes"] > a["bytes"] > 0  # wider beams cost more
    # the HSD part: per layer T * (8d^2 + 2d^2 + 4dh) + 4 T^2 d, h = 4d
    d, t = 32, 16
    hsd = 2 * (t * (8 * d * d + 2 * d * d + 16 * d * d) + 4 * t * t * d)
    assert a["flops"] > hsd
