"""benchmarks/roofline_rl_iteration.py: the op counter's FLOPs and bytes by hand, the per-unit / fixed split, and the
floors of a tiny iteration (counted matmul FLOPs equal the analytic formula; the floors ordered)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import roofline_rl_iteration as roof

TINY = (
    "--history 3 --d-model 16 --n-layers 1 --n-heads 2 --group-size 4 --ads 60 --organic 80 --users 100 "
    "--advertisers 6 --levels 2 --codebook 4 --kmeans-iters 2 --sessions 8 --requests 2 --threads 1"
).split()


def test_the_counter_reads_flops_and_bytes_of_each_op():
    """A matmul: 2 m k n FLOPs, its inputs read and output written once; a view: nothing; an in-place add: its
    tensor read and written; a gather: the rows it returns, not its table."""
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    table, ids = torch.randn(1000, 4), torch.tensor([3, 5, 3])
    counter = roof.OpCounter()
    with counter:
        c = a @ b
        c.t()  # a view
        c.add_(1.0)
        F.embedding(ids, table)
    ops = counter.ops
    assert ops["mm"] == {"launches": 1, "flops": 2 * 8 * 16 * 4, "bytes": 4 * (8 * 16 + 16 * 4 + 8 * 4)}
    assert "t" not in ops and "transpose" not in ops
    assert ops["add_"]["bytes"] == 4 * (8 * 4 + 8 * 4)  # c read and written (the scalar is no tensor)
    assert (
        ops["embedding"]["bytes"] == 8 * 3 + 4 * 3 * 4 + 4 * 3 * 4
    )  # ids, the 3 rows read, the 3 rows written


def test_op_classes():
    assert [
        roof.op_class(n)
        for n in ("addmm", "_scaled_dot_product_flash_attention_for_cpu_backward", "_to_copy")
    ] == [
        "matmul",
        "attention",
        "cast",
    ]
    assert [
        roof.op_class(n) for n in ("native_layer_norm_backward", "embedding_dense_backward", "cat", "gelu")
    ] == [
        "norm",
        "gather",
        "layout",
        "element-wise",
    ]


def test_model_parts_name_the_module_below_the_model():
    assert roof.model_part("PathTerms.model.hsd.blocks.0.ffn.mlps.1.fc") == "hsd.blocks.ffn"
    assert roof.model_part("GPRModel.hsd.code_emb.2") == "hsd.code_emb"
    assert roof.model_part("PathTerms.model.ptd.thinking.mlp.fc") == "ptd.thinking"
    assert roof.model_part("PathTerms.model") == "model (its own code)"
    assert roof.model_part("Global") == roof.model_part("") == roof.OUTSIDE


def test_the_fit_splits_per_unit_from_fixed_costs():
    small = {"mm": {"launches": 3, "flops": 10.0, "bytes": 7.0}}
    large = {
        "mm": {"launches": 3, "flops": 18.0, "bytes": 9.0},
        "new": {"launches": 1, "flops": 0.0, "bytes": 4.0},
    }
    line = roof.fit(small, large, 4)  # 4 and 8 units
    assert line["mm"] == {"launches": (0.0, 3.0), "flops": (2.0, 2.0), "bytes": (0.5, 5.0)}
    assert line["new"]["bytes"] == (1.0, 0.0)
    assert roof.scale(line, 100, 3)["mm"] == {"launches": 9.0, "flops": 3 * 202.0, "bytes": 3 * 55.0}


def test_tiny_iteration_floors_match_the_formula_and_are_ordered(tmp_path):
    out = tmp_path / "roofline.json"
    result = roof.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text())["update"]["floors"] == pytest.approx(result["update"]["floors"])
    upd = result["update"]["floors"]
    # the counted update matmuls are the ones bench_rl_iteration's formula adds up (it leaves out a few small ones)
    assert upd["flops"] == pytest.approx(result["update"]["formula_flops"], rel=0.1)
    for phase in ("rollout", "update"):
        f = result[phase]["floors"]
        tol = 1 + 1e-9  # sums of the same terms in another order
        assert 0 < f["matmul_floor_s"] <= f["fused_roofline_s"] * tol <= f["eager_roofline_s"] * tol**2
        assert f["bytes_floor_s"] <= f["eager_roofline_s"] * tol and f["launches"] > 0
        assert all(math.isfinite(v) and v >= 0 for o in result[phase]["ops"].values() for v in o.values())
        for key in roof.COSTS:  # the same counts by model part: every op in one part
            by_part = sum(o[key] for o in result[phase]["parts"].values())
            assert by_part == pytest.approx(sum(o[key] for o in result[phase]["ops"].values()), rel=1e-9)
        assert any(name.startswith("hsd.blocks.") for name in result[phase]["parts"])


def test_bad_flags_are_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        roof.main([*TINY, "--requests", "0"])
    assert "--requests must be >= 1, got 0" in capsys.readouterr().err
