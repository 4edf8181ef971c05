"""agents.plots: Table 3 analogue, final table and figures from hand-written run folders (2 algos x 2 seeds)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from agents import plots

T975_DF1 = 12.706
"""two-sided 95% Student t quantile, 1 degree of freedom (two seeds)"""


def eval_row(it: int, reward: float, cand: float) -> dict:
    """An evaluation row: online metrics derived from ``reward``, candidate metrics from ``cand``."""
    return {"iteration": it, "env_steps": 16 * it,
            "eval/reward_per_session": reward, "eval/reward_per_session_ci_low": reward - 1,
            "eval/reward_per_session_ci_high": reward + 1, "eval/gmv_per_session": 2 * reward,
            "eval/ctcvr": reward / 100, "eval/revenue_per_session": reward / 2,
            "eval/cand_ndcg": cand, "eval/cand_opr": cand + 0.1, "eval/cand_mean_value": cand / 2,
            "eval/cand_max_value": 2 * cand, "eval/cand_top1_value": cand / 4}  # fmt: skip


def make_run(root, algo: str, seed: int, start: tuple[float, float], final: tuple[float, float]):
    run = root / f"ads-v0__{algo}__{seed}"
    run.mkdir(parents=True)
    cfg = {"algo": algo, "seed": seed, "env": "ads-v0", "init": f"pre/ads-v0__{seed}/vaft"}
    (run / "config.json").write_text(json.dumps(cfg))
    rows = [eval_row(0, *start), {"iteration": 1, "env_steps": 16, "train/loss": 0.5}, eval_row(2, *final)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


# iteration 0 is the shared VAFT generator of the seed: the same row for both algorithms of a seed
START = {0: (0.5, 0.30), 1: (0.7, 0.40)}
FINAL = {("hepo", 0): (1.0, 0.40), ("hepo", 1): (3.0, 0.50), ("ppo", 0): (1.0, 0.35), ("ppo", 1): (1.5, 0.35)}


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path / "runs", algo, seed, START[seed], FINAL[algo, seed]) for algo, seed in FINAL]


def by_stage(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["stage"]: r for _, r in table.iterrows()}


def test_t_interval_is_the_ablation_one():
    # two values a, b: s = |a - b| / sqrt(2), half = t * s / sqrt(2) = t |a - b| / 2
    mean, lo, hi = plots.t_interval([1.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(T975_DF1, abs=2e-3) and mean - lo == pytest.approx(hi - mean)
    assert math.isnan(plots.t_interval([1.0])[1])


def test_final_table_means_and_seed_intervals(runs):
    t = by_stage(plots.final_table(runs))
    assert list(t) == ["VAFT", "+PPO", "+HEPO"]  # baselines first, as in GPR Table 3
    # HEPO: rewards 1.0, 3.0 -> mean 2.0, half = 12.706 * |1 - 3| / 2 = 12.706
    h = t["+HEPO"]
    assert h["n"] == 2 and h["iteration"] == 2
    assert h["reward_per_session"] == pytest.approx(2.0)
    assert h["reward_per_session_ci_high"] == pytest.approx(2.0 + T975_DF1, abs=2e-3)
    assert h["reward_per_session_ci_low"] == pytest.approx(2.0 - T975_DF1, abs=2e-3)
    # GMV = 2 reward: mean 4.0, half 2 * 12.706; revenue = reward / 2: mean 1.0; CTCVR = reward / 100
    assert h["gmv_per_session"] == pytest.approx(4.0)
    assert h["gmv_per_session_ci_high"] - 4.0 == pytest.approx(2 * T975_DF1, abs=4e-3)
    assert h["revenue_per_session"] == pytest.approx(1.0) and h["ctcvr"] == pytest.approx(0.02)
    # PPO: rewards 1.0, 1.5 -> mean 1.25, half = 12.706 * 0.25 = 3.1765
    p = t["+PPO"]
    assert p["reward_per_session"] == pytest.approx(1.25)
    assert p["reward_per_session_ci_high"] - 1.25 == pytest.approx(T975_DF1 * 0.25, abs=1e-3)
    # VAFT start: two generators (one per seed, shared by both algorithms), not four runs:
    # rewards 0.5, 0.7 -> mean 0.6, half = 12.706 * 0.1
    v = t["VAFT"]
    assert v["n"] == 2 and v["iteration"] == 0
    assert v["reward_per_session"] == pytest.approx(0.6)
    assert v["reward_per_session_ci_high"] - 0.6 == pytest.approx(T975_DF1 * 0.1, abs=1e-3)
    assert "VAFT" not in by_stage(plots.final_table(runs, start=False))


def test_table3_values_and_paper_columns(runs):
    t = by_stage(plots.table3(runs))
    # HEPO final cand 0.40, 0.50: ndcg mean 0.45, half 12.706 * 0.05; opr = cand + 0.1; max = 2 cand
    h = t["+HEPO"]
    assert h["ndcg"] == pytest.approx(0.45) and h["opr"] == pytest.approx(0.55)
    assert h["mean_value"] == pytest.approx(0.225) and h["max_value"] == pytest.approx(0.9)
    assert h["top1_value"] == pytest.approx(0.1125)
    assert h["ndcg_ci_high"] - 0.45 == pytest.approx(T975_DF1 * 0.05, abs=1e-3)
    # PPO: both seeds 0.35 -> zero-width interval
    p = t["+PPO"]
    assert p["ndcg"] == pytest.approx(0.35) and p["ndcg_ci_low"] == pytest.approx(p["ndcg_ci_high"])
    # VAFT: iteration-0 cand 0.30, 0.40 over the two generators
    v = t["VAFT"]
    assert v["ndcg"] == pytest.approx(0.35) and v["n"] == 2
    assert v["ndcg_ci_high"] - 0.35 == pytest.approx(T975_DF1 * 0.05, abs=1e-3)
    # the paper's Table 3 beside ours; none for PPO, no top-1 column in the paper
    assert h["paper_ndcg"] == 0.4413 and h["paper_max_value"] == 0.7619
    assert v["paper_opr"] == 0.5348 and math.isnan(v["paper_mean_value"])
    assert math.isnan(p["paper_ndcg"]) and "paper_top1_value" not in t["+HEPO"]


def test_single_seed_has_no_interval(runs):
    t = by_stage(plots.final_table(runs[:1]))
    assert t["+HEPO"]["n"] == 1 and t["+HEPO"]["reward_per_session"] == 1.0
    assert math.isnan(t["+HEPO"]["reward_per_session_ci_low"])
    assert "n/a" not in plots.to_markdown(plots.final_table(runs[:1]), plots.FINAL)


def test_main_writes_every_file(runs, tmp_path):
    out = tmp_path / "report"
    files = plots.main([*map(str, runs), "--out", str(out)])
    names = {"curves.png", "table3.csv", "table3.md", "final_table.csv", "final_table.md", "final.png"}
    assert {p.name for p in files.values()} == names
    assert {p.name for p in out.iterdir()} == names  # no temp files left behind
    assert all((out / n).stat().st_size > 0 for n in names)
    csv = pd.read_csv(out / "final_table.csv")
    assert list(csv["stage"]) == ["VAFT", "+PPO", "+HEPO"]
    assert csv.loc[2, "reward_per_session"] == pytest.approx(2.0)
    md = (out / "table3.md").read_text()
    assert "| +HEPO | 2 | 0.4500 [" in md and "0.4413" in md


def test_bad_folders_raise(runs, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="not_a_run"):
        plots.table3([*runs, empty])
    with pytest.raises(SystemExit, match=r"no metrics.jsonl\): .*not_a_run"):
        plots.main([str(runs[0]), str(empty), "--out", str(tmp_path / "o")])
    (empty / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "train/loss": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no evaluation rows"):
        plots.final_table([empty])
    with pytest.raises(ValueError, match="no run folders"):
        plots.final_table([])


def test_pretrain_table_and_plot_chain_vaft_after_mtp(tmp_path):
    def stage(name, init, hit):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"stage": name, "top_k": 10, "init": init}))
        rows = [{"step": s, "eval/loss": 4.0 - h, "eval/hitrate@10": h, "eval/ndcg@10": h / 2,
                 "eval/pop_hitrate@10": 0.2, "eval/pop_ndcg@10": 0.1} for s, h in zip((0, 5, 10), hit)]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    mtp = stage("mtp", "", (0.0, 0.1, 0.3))
    vaft = stage("vaft", str(mtp / "checkpoint.pt"), (0.3, 0.35, 0.4))
    assert plots._step_offsets([mtp, vaft]) == {mtp: 0, vaft: 10}  # VAFT continues MTP's 10 steps
    table = plots.pretrain_table([mtp, vaft])
    assert list(table["stage"]) == ["mtp", "vaft"]
    assert table.loc[0, "hitrate@10_end"] == 0.3 and table.loc[1, "eval_loss_end"] == pytest.approx(3.6)
    assert table.loc[1, "pop_hitrate@10"] == 0.2
    path = plots.plot_pretrain([mtp, vaft], tmp_path / "p" / "pretrain.png")
    assert path.stat().st_size > 0
