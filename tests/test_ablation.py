"""agents.ablation: the GPR Table 2 analogue (variants, shared inputs, t intervals, resumable runs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from agents import ablation

TINY = "--collect-envs 16 --collect-steps 30 --d-model 16 --n-layers 1 --batch-size 32 --steps 4 --eval-every 2 --eval-requests 30 --threads 1".split()


def test_build_table_t_intervals_and_paired_deltas():
    # hitrate@10 over seeds 0, 1, 2: hstu 0.10, 0.20, 0.30; +mtp 0.16, 0.28, 0.37 (differences 0.06, 0.08, 0.07)
    # +mtp: mean 0.27, s = sqrt(0.0222 / 2) = 0.105357, half = 4.302653 * s / sqrt(3) = 0.261720
    # paired delta: mean 0.07, s = 0.01, half = 4.302653 * 0.01 / sqrt(3) = 0.024841
    # (unpaired, the seeds' spread of ~0.1 would swamp a 0.07 gain: the pairing is what resolves it)
    def summary(hr: float) -> dict:
        return {
            "final": {"step": 4, "eval/hitrate@10": hr, "eval/ndcg@10": hr / 2, "eval/pop_hitrate@10": 0.05}
        }

    results = {
        "hstu": {s: summary(v) for s, v in enumerate((0.10, 0.20, 0.30))},
        "+mtp": {s: summary(v) for s, v in enumerate((0.16, 0.28, 0.37))},
    }
    table = ablation.build_table(results, ablation.Args(seeds="0,1,2")).set_index("variant")
    m = table.loc["+mtp"]
    assert m["hitrate@10"] == pytest.approx(0.27)
    assert m["hitrate@10_ci_high"] - m["hitrate@10"] == pytest.approx(0.261720, abs=1e-6)
    assert m["delta_hitrate@10"] == pytest.approx(0.07)
    assert m["delta_hitrate@10_ci_high"] - m["delta_hitrate@10"] == pytest.approx(0.024841, abs=1e-6)
    assert m["delta_hitrate@10_ci_low"] > 0  # every seed gains
    assert m["delta_ndcg@10"] == pytest.approx(0.035)
    assert table.loc["hstu", "delta_hitrate@10"] == 0.0
    # without hstu in the run there is no pair: NaN deltas, not an error
    alone = ablation.build_table({"+mtp": results["+mtp"]}, ablation.Args(seeds="0,1,2"))
    assert math.isnan(alone.loc[0, "delta_hitrate@10"]) and alone.loc[0, "hitrate@10"] == pytest.approx(0.27)


def test_variants_differ_from_hstu_by_one_component():
    base = ablation.VARIANTS["hstu"]
    assert not any(v for k, v in base.items() if k != "mtp_heads") and base["mtp_heads"] == 1
    for name, switches in ablation.VARIANTS.items():
        if name in ("hstu", "full"):
            continue
        assert sum(switches[k] != base[k] for k in base) == 1, name
    assert set(ablation.VARIANTS) == set(ablation.PAPER_HITRATE_100)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match=r"\+nope"):
        ablation.main(["--variants", "hstu,+nope", "--out", "unused"])


def test_ablation_table_and_skip(tmp_path):
    out = tmp_path / "abl"
    argv = ["--variants", "hstu,+thinking", "--seeds", "0,1", "--out", str(out), *TINY]
    table = ablation.main(argv)
    assert list(table["variant"]) == ["hstu", "+thinking"]
    csv = pd.read_csv(out / "table2.csv")
    for col in (
        "hitrate@10",
        "hitrate@10_ci_low",
        "hitrate@10_ci_high",
        "ndcg@10",
        "ndcg@10_ci_low",
        "ndcg@10_ci_high",
        "delta_hitrate@10",
        "delta_ndcg@10_ci_high",
        "paper_hitrate@100",
        "paper_delta_hitrate@100",
        "pop_hitrate@10",
        "seeds",
    ):
        assert col in csv.columns, col
        assert np.isfinite(csv[col].to_numpy(float)).all(), col
    assert (csv["hitrate@10_ci_low"] <= csv["hitrate@10"]).all() and (
        csv["hitrate@10"] <= csv["hitrate@10_ci_high"]
    ).all()
    assert csv.loc[0, "delta_hitrate@10"] == 0.0 and csv.loc[0, "paper_hitrate@100"] == 18.98
    assert (out / "table2.png").stat().st_size > 0
    data = json.loads((out / "table2.json").read_text())
    assert data["variants"]["+thinking"]["thinking"] is True and len(data["table"]) == 2
    # one log, one tokenizer: every run points at OUT/shared
    for variant in ("hstu", "+thinking"):
        for seed in (0, 1):
            cfg = json.loads((out / variant / f"seed{seed}" / "config.json").read_text())
            assert cfg["logs_path"] == str(out / "shared" / "logs.parquet")
            assert cfg["tokenizer_path"] == str(out / "shared" / "tokenizer")
            assert cfg["steps"] == 4 and cfg["seed"] == seed
    assert not (out / "hstu" / "seed0" / "logs.parquet").exists()
    summaries = sorted(out.glob("*/seed*/summary.json"))
    assert len(summaries) == 4
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    again = ablation.main(argv)
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes  # finished runs are skipped
    pd.testing.assert_frame_equal(again, table)
    assert all(
        r["seconds"] is None
        for runs in json.loads((out / "table2.json").read_text())["runs"].values()
        for r in runs.values()
    )
