"""benchmarks/exit_diagnosis.py: the true match of what a policy shows, its ad load and its exits, per agent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gpr_sim.world.config import WorldConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "exit_diagnosis.py"
_spec = importlib.util.spec_from_file_location("exit_diagnosis", _PATH)
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

ARGS = ["--preset", "small", "--num-envs", "32", "--steps", "12"]
SLOTS = WorldConfig.small().num_slots


def test_rows_are_ratios_of_slot_sums_and_pair_against_the_reference(tmp_path):
    res = diag.main(["--agents", "random,cascade-privileged", *ARGS, "--out", str(tmp_path / "d.json")])
    rand, casc = res["rows"]
    assert res["reference"] == "random" and "delta_match_per_impression" not in rand
    for name in diag.RATIOS:
        # the paired difference's value is the difference of the two ratios of sums (the same slots)
        assert casc[f"delta_{name}"] == pytest.approx(casc[name] - rand[name])
        assert casc[f"{name}_ci_low"] <= casc[name] <= casc[f"{name}_ci_high"]
    for row in (rand, casc):  # every ad slot of a request is shown, refused by a budget or unsold
        slots = row["impressions_per_request"] + row["refused_per_request"] + row["unsold_per_request"]
        assert slots == pytest.approx(SLOTS)
    assert casc["unsold_per_request"] < rand["unsold_per_request"]  # random ids are mostly below the reserve
    assert -1.0 <= rand["match_per_impression"] <= 1.0
    assert 0.0 < casc["exits_per_request"] < 1.0
    # the privileged cascade ranks by the hidden interest: what it shows matches users better than random
    assert casc["delta_match_per_impression_ci_low"] > 0
    assert (tmp_path / "d.json").is_file()


def test_bad_arguments_fail_clearly():
    with pytest.raises(SystemExit, match="--reference 'oracle' must be one of"):
        diag.main(["--agents", "random", "--reference", "oracle", *ARGS])
    with pytest.raises(SystemExit, match="need >= 2 slots"):
        diag.main(["--agents", "random", "--preset", "small", "--num-envs", "1"])
