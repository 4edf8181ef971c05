"""``benchmarks/pretrain_bundle.py``: a pre-training pipeline packed into small parts, unpacked elsewhere, and
the RL run from it without pre-training again."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import agents.hepo as hepo
from agents.policies.gpr import load_run_model
from benchmarks import pretrain_bundle as bundle
from tests.test_hepo import pre, tiny  # noqa: F401  (the module fixture: a tiny pre-trained generator)


@pytest.fixture(scope="module")
def pipeline(pre, tmp_path_factory):  # noqa: F811
    """The fixture's stages with the reward funnel fitted beside them (what an RL run needs)."""
    src = tmp_path_factory.mktemp("bundle") / "pre"
    shutil.copytree(pre, src)
    hepo.main(tiny(src, src.parent / "unused", "--pretrain-only"))
    return src


def _same_weights(a, b, rounded: bool) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        want = x.to(torch.bfloat16).float() if rounded and x.is_floating_point() else x
        assert torch.equal(y, want), k


def test_round_trip_in_parts_then_the_rl_runs_without_pretraining(pipeline, tmp_path):
    parts = bundle.pack(pipeline, tmp_path / "parts", part_mib=0.05)
    assert len(parts) > 1 and all(p.stat().st_size <= 0.05 * 2**20 for p in parts)
    moved = bundle.unpack(tmp_path / "parts", tmp_path / "moved" / "pre")
    (a, tok_a), (b, tok_b) = load_run_model(pipeline / "vaft"), load_run_model(moved / "vaft")
    _same_weights(a, b, rounded=True)  # bf16 on the way: the start to bfloat16's precision
    assert torch.equal(tok_a.table.item_to_path, tok_b.table.item_to_path)  # the semantic IDs exactly
    assert json.loads((moved / "bundle.json").read_text())["weights"] == "bf16"
    run = tmp_path / "run"
    hepo.main(tiny(moved, run, "--iterations", "1"))
    assert json.loads((run / "config.json").read_text())["init"] == str(moved / "vaft")
    assert (run / "summary.json").is_file()
    assert not list(moved.rglob("*.parquet"))  # nothing collected, fitted or trained again
    assert not (moved / "vaft" / "checkpoint.pt").exists()


def test_fp32_weights_travel_exactly_and_bad_parts_are_refused(pipeline, tmp_path):
    parts = bundle.pack(pipeline, tmp_path / "parts", part_mib=0.05, weights="fp32", stages=("mtp", "vaft"))
    moved = bundle.unpack(tmp_path / "parts", tmp_path / "a" / "pre")
    for stage in ("mtp", "vaft"):
        _same_weights(load_run_model(pipeline / stage)[0], load_run_model(moved / stage)[0], rounded=False)
    with pytest.raises(ValueError, match="exists; unpack into an empty pipeline folder"):
        bundle.unpack(tmp_path / "parts", moved)
    data = bytearray(parts[1].read_bytes())
    data[0] ^= 1
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not add up to what was packed"):
        bundle.unpack(tmp_path / "parts", tmp_path / "b" / "pre")
    parts[1].unlink()
    with pytest.raises(ValueError, match=r"bundle parts \['pre_bundle.001'\] are missing"):
        bundle.unpack(tmp_path / "parts", tmp_path / "c" / "pre")
    with pytest.raises(ValueError, match="weights='fp16' is unknown"):
        bundle.pack(pipeline, tmp_path / "x", weights="fp16")
    with pytest.raises(ValueError, match="no finished stage here"):
        bundle.pack(tmp_path / "nothing", tmp_path / "x")
