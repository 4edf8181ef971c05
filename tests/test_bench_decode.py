"""benchmarks/bench_decode.py runs end to end on CPU with tiny sizes and writes the documented JSON (the
decoder it times: tests/test_incremental.py)."""

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

TINY_ARGS = "--device cpu --sizes 6,10 --beams 2,4 --top-k 3 --seq-len 12 --items 500 --levels 6,5,4 --d-model 32 --n-layers 2 --n-heads 2 --chunk 4 --naive-requests 2 --train-batch 3 --train-steps 1".split()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_main_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    main([*TINY_ARGS, "--out", str(out)])
    res = json.loads(out.read_text())
    for key in (
        "device",
        "torch",
        "date",
        "command",
        "args",
        "config",
        "matmul_flops_per_s",
        "copy_bytes_per_s",
        "naive_decisions_per_s",
        "rows",
        "train",
        "ffn_impls",
    ):
        assert key in res, key
    assert _positive(res["matmul_flops_per_s"]) and _positive(res["copy_bytes_per_s"])
    assert set(res["naive_decisions_per_s"]) == {"2", "4"}
    rows = res["rows"]
    assert [(r["mode"], r["n"], r["beam"]) for r in rows] == [
        ("eager", n, w) for n in (6, 10) for w in (2, 4)
    ]
    for r in rows:
        assert "error" not in r, r
        for key in (
            "decisions_per_s",
            "seconds",
            "flops_per_decision",
            "flops_min_per_decision",
            "bytes_per_decision",
            "floor_decisions_per_s",
            "frac_of_floor",
            "naive_decisions_per_s",
            "x_naive",
            "achieved_flops_per_s",
        ):
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


INC_ARGS = "--device cpu --sizes 6 --beams 2,4 --top-k 3 --seq-len 12 --items 500 --levels 6,5,4 --d-model 32 --n-layers 2 --n-heads 2 --chunk 4 --naive-requests 2 --train-batch 0 --mode full,incremental --new-tokens 3".split()


def test_incremental_mode_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    main([*INC_ARGS, "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["decode"], r["mode"], r["n"], r["beam"]) for r in rows] == [
        (m, "eager", 6, w) for m in ("full", "incremental") for w in (2, 4)
    ]
    assert set(res["naive_incremental_decisions_per_s"]) == {"2", "4"}
    assert "partial" not in res  # the per-row checkpoints are replaced by the final result
    assert _positive(res["prefill"]["users_per_s"]) and _positive(res["prefill"]["state_bytes_per_user"])
    for r in rows:
        assert "error" not in r, r
        for key in (
            "decisions_per_s",
            "flops_per_decision",
            "bytes_per_decision",
            "floor_decisions_per_s",
            "frac_of_floor",
            "x_naive",
        ):
            assert _positive(r[key]), (key, r)
    inc = [r for r in rows if r["decode"] == "incremental"]
    full = [r for r in rows if r["decode"] == "full"]
    for a, b in zip(inc, full, strict=True):
        assert a["flops_per_decision"] < b["flops_per_decision"]  # a few new tokens, not T
        assert a["new_tokens"] == 3 and a["prefix_len"] == 12 and _positive(a["kv_bytes_per_decision"])


def test_env_step_rows_time_decode_and_env_together(tmp_path):
    """--env-step adds an 'incremental+env' row per mode: the decoded top-K go through the env's step."""
    out = tmp_path / "bench.json"
    args = [a for a in INC_ARGS if a != "full,incremental"]
    args[args.index("--mode") + 1 : args.index("--mode") + 1] = ["incremental"]
    main([*args, "--beams", "2", "--naive-requests", "0", "--env-step", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decode"], r["mode"]) for r in rows] == [
        ("incremental", "eager"),
        ("incremental+env", "eager"),
    ]
    dec, env = rows
    assert "error" not in env, env
    assert _positive(env["decisions_per_s"]) and env["env_bytes_per_step"] > 0
    assert env["bytes_per_decision"] == dec["bytes_per_decision"] + env["env_bytes_per_step"]


def test_incremental_mode_rejects_no_new_tokens(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--new-tokens"):  # the last --new-tokens wins (argparse)
        main([*INC_ARGS, "--new-tokens", "0", "--out", str(tmp_path / "bench.json")])
