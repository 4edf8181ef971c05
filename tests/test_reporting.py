"""agents.reporting (and its entry point agents.plots): Table 3 / 4 / 5 analogues, final table and figures from
hand-written run folders."""

from __future__ import annotations

import json
import math
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from agents import plots
from agents.reporting import figures, folders, keys, report, tables
from agents.rl import selection
from gpr_sim.stats import relative_change, t_interval

T975_DF1 = 12.706
"""two-sided 95% Student t quantile, 1 degree of freedom (two seeds)"""
T975_DF2 = 4.303
"""two-sided 95% Student t quantile, 2 degrees of freedom (three seeds)"""


def eval_row(it: int, reward: float, cand: float) -> dict:
    """An evaluation row: online metrics derived from ``reward``, candidate metrics from ``cand``."""
    return {
        "iteration": it,
        "env_steps": 16 * it,
        "eval/reward_per_session": reward,
        "eval/reward_per_session_ci_low": reward - 1,
        "eval/reward_per_session_ci_high": reward + 1,
        "eval/gmv_per_session": 2 * reward,
        "eval/ctcvr": reward / 100,
        "eval/revenue_per_session": reward / 2,
        "eval/ctr": 0.05 + reward / 100,
        "eval/cvr": cand / 10,
        "eval/cand_ndcg": cand,
        "eval/cand_opr": cand + 0.1,
        "eval/cand_mean_value": cand / 2,
        "eval/cand_max_value": 2 * cand,
        "eval/cand_top1_value": cand / 4,
    }


def make_run(
    root, algo: str, seed: int, start: tuple[float, float], final: tuple[float, float], row=eval_row
):
    run = root / f"ads-v0__{algo}__{seed}"
    run.mkdir(parents=True)
    cfg = {"algo": algo, "seed": seed, "env": "ads-v0", "init": f"pre/ads-v0__{seed}/vaft"}
    (run / "config.json").write_text(json.dumps(cfg))
    rows = [row(0, *start), {"iteration": 1, "env_steps": 16, "train/loss": 0.5}, row(2, *final)]
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


def test_curve_band_is_the_tables_t_interval(runs):
    # HEPO rewards at the last evaluation 1.0, 3.0: the final table's t interval 2.0 -+ 12.706 is the band's
    # last point; at iteration 0 both HEPO runs start from the two VAFT generators (0.5, 0.7): the VAFT row
    fin = by_stage(tables.final_table(runs))
    curves = figures.seed_curves(runs, "eval/reward_per_session")
    h = curves["hepo"]
    assert h["n"] == 2 and list(h["x"]) == [0.0, 32.0]
    for i, stage in ((-1, "+HEPO"), (0, "VAFT")):
        row = fin[stage]
        assert (h["mean"][i], h["low"][i], h["high"][i]) == pytest.approx(
            (row["reward_per_session"], row["reward_per_session_ci_low"], row["reward_per_session_ci_high"])
        )
    assert h["high"][-1] - h["mean"][-1] == pytest.approx(T975_DF1 * 1.0, abs=1e-3)  # not 1.96 * 1.0
    # the 90% band is the 90% table interval
    fin90, h90 = (
        by_stage(tables.final_table(runs, 0.9)),
        figures.seed_curves(runs, "eval/reward_per_session", level=0.9),
    )
    assert h90["hepo"]["high"][-1] == pytest.approx(fin90["+HEPO"]["reward_per_session_ci_high"])
    # one run: its own CI columns (reward -+ 1 in these rows), else no band
    one = figures.seed_curves(runs[:1], "eval/reward_per_session")["hepo"]
    assert one["n"] == 1 and list(one["low"]) == [-0.5, 0.0] and list(one["high"]) == [1.5, 2.0]
    assert math.isnan(figures.seed_curves(runs[:1], "eval/ctcvr")["hepo"]["low"][0])


def test_plotted_band_and_legend(runs, tmp_path, monkeypatch):
    """The figure draws ``seed_curves`` band, and its one legend (under the panels) says which interval it is."""
    figs = []
    monkeypatch.setattr(
        figures, "figure_bytes", lambda fig, dpi: figs.append(fig) or b""
    )  # keeps the figure open
    figures.plot_curves(runs, tmp_path / "curves.png", metrics=("eval/reward_per_session",), level=0.9)
    ax = figs[0].axes[0]
    legend = [t.get_text() for t in figs[0].legends[0].get_texts()]
    assert legend == ["hepo (n=2)", "ppo (n=2)", "band: 90% t interval over seeds (n=1: the run's own CI)"]
    want = figures.seed_curves(runs, "eval/reward_per_session", level=0.9)["hepo"]
    band = ax.collections[0].get_paths()[0].vertices  # hepo's filled polygon: (x, low) then (x, high)
    at_last = band[np.isclose(band[:, 0], 32.0), 1]
    assert (at_last.min(), at_last.max()) == pytest.approx((want["low"][-1], want["high"][-1]))
    plt.close(figs[0])


def test_final_table_means_and_seed_intervals(runs):
    t = by_stage(tables.final_table(runs))
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
    assert "VAFT" not in by_stage(tables.final_table(runs, start=False))


def test_table3_values_and_paper_columns(runs):
    t = by_stage(tables.table3(runs))
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


def test_table3_mtp_row_from_the_iteration_0_evaluations(tmp_path):
    """Runs that logged their MTP stage (eval/mtp/cand_*) get an MTP row before VAFT, one unit per generator."""

    def with_mtp(it, reward, cand):
        r = eval_row(it, reward, cand)
        if it == 0:
            r.update({f"eval/mtp/cand_{m}": r[f"eval/cand_{m}"] / 2 for m in keys.TABLE3})
        return r

    runs = [
        make_run(tmp_path / "r", algo, seed, START[seed], FINAL[algo, seed], row=with_mtp)
        for algo, seed in FINAL
    ]
    t = tables.table3(runs)
    assert list(t["stage"]) == ["MTP", "VAFT", "+PPO", "+HEPO"]
    m = by_stage(t)["MTP"]
    # VAFT cand 0.30, 0.40 over the two generators -> MTP 0.15, 0.20: mean 0.175, half 12.706 * 0.025
    assert m["n"] == 2 and m["ndcg"] == pytest.approx(0.175)
    assert m["ndcg_ci_high"] - 0.175 == pytest.approx(T975_DF1 * 0.025, abs=1e-3)
    assert m["paper_ndcg"] == 0.3868
    # a run without the MTP keys from a generator that has them elsewhere (an older folder): the same MTP row
    old = make_run(tmp_path / "old", "dpo", 0, START[0], FINAL["hepo", 0])
    same = by_stage(tables.table3([*runs, old]))["MTP"]
    assert same["n"] == 2 and same["ndcg"] == pytest.approx(0.175)
    # a third generator whose runs never logged MTP (a start from a VAFT-only bundle): in VAFT, not in MTP
    cfg = json.loads((old / "config.json").read_text())
    bundle = make_run(tmp_path / "bundle", "hepo", 2, (0.6, 0.50), FINAL["hepo", 0])
    (bundle / "config.json").write_text(json.dumps({**cfg, "algo": "hepo", "seed": 2, "init": "pre/b2/vaft"}))
    t3 = by_stage(tables.table3([*runs, bundle]))
    assert t3["VAFT"]["n"] == 3 and t3["VAFT"]["ndcg"] == pytest.approx(0.40)
    assert t3["MTP"]["n"] == 2 and t3["MTP"]["ndcg"] == pytest.approx(0.175)
    # paired by generator: MTP - VAFT = -0.15, -0.20 (generators 0, 1); generator 2 has no MTP
    assert t3["MTP"]["ndcg_vs_vaft"] == pytest.approx(-0.175)
    assert t3["MTP"]["ndcg_vs_vaft_ci_high"] - -0.175 == pytest.approx(T975_DF1 * 0.025, abs=1e-3)
    # HEPO's runs minus their own generator: 0.40 - 0.30, 0.50 - 0.40, 0.40 - 0.50 (the bundle's run)
    h = t3["+HEPO"]
    assert h["n"] == 3 and h["ndcg_vs_vaft"] == pytest.approx(0.1 / 3)
    assert h["ndcg_vs_vaft_ci_high"] - 0.1 / 3 == pytest.approx(
        T975_DF2 * np.std([0.1, 0.1, -0.1], ddof=1) / 3**0.5, abs=1e-3
    )
    assert math.isnan(t3["VAFT"]["ndcg_vs_vaft"])
    md = tables.table3_markdown(tables.table3([*runs, bundle]))
    assert "| MTP | 2 | -0.1750 [" in md and "| +HEPO | 3 | +0.0333 [" in md
    # no run with MTP: no MTP row
    plain = [make_run(tmp_path / "plain", algo, seed, START[seed], FINAL[algo, seed]) for algo, seed in FINAL]
    assert "MTP" not in set(tables.table3(plain)["stage"])


def test_single_seed_has_no_interval(runs):
    t = by_stage(tables.final_table(runs[:1]))
    assert t["+HEPO"]["n"] == 1 and t["+HEPO"]["reward_per_session"] == 1.0
    assert math.isnan(t["+HEPO"]["reward_per_session_ci_low"])
    assert "n/a" not in tables.to_markdown(tables.final_table(runs[:1]), keys.FINAL)


def test_main_writes_every_file(runs, tmp_path):
    out = tmp_path / "report"
    files = plots.main([*map(str, runs), "--out", str(out)])
    names = {
        "curves.png",
        "table3.csv",
        "table3.md",
        "final_table.csv",
        "final_table.md",
        "final.png",
        "table4.csv",
        "table4.md",
    }
    assert {p.name for p in files.values()} == names
    assert {p.name for p in out.iterdir()} == names  # no temp files left behind
    assert all((out / n).stat().st_size > 0 for n in names)
    csv = pd.read_csv(out / "final_table.csv")
    assert list(csv["stage"]) == ["VAFT", "+PPO", "+HEPO"]
    assert csv.loc[2, "reward_per_session"] == pytest.approx(2.0)
    md = (out / "table3.md").read_text()
    assert "| +HEPO | 2 | 0.4500 [" in md and "0.4413" in md
    t4 = pd.read_csv(out / "table4.csv")
    assert (
        list(t4["stage"]) == ["VAFT", "+PPO", "+HEPO"]
        and "reward_per_session_vs_cascade-privileged" not in t4
    )
    # HEPO reward 1.0 / 0.5 - 1 = 1.0 and 3.0 / 0.7 - 1 = 3.2857 (seed by seed): mean 2.1429
    assert t4.loc[2, "reward_per_session_vs_prev"] == pytest.approx((1.0 + 3.0 / 0.7 - 1) / 2)
    # half = 12.706 * |1.0 - 3.2857| / 2 = 14.521: the reward cell ends the +HEPO line
    assert re.search(
        r"\| \+HEPO \| 2 \|.* \| \+214\.29% \[-123[78]\.\d\d%, \+166[56]\.\d\d%\] \|\n",
        (out / "table4.md").read_text(),
    )


def test_best_policy_rows_are_the_highest_held_out_reward(runs, tmp_path):
    """``--policy best`` reports each run at the evaluation ``agents.hepo`` keeps its best policy from: the
    highest finite reward per session, the earliest of equal ones (the rows of ``keep_best``'s own test)."""
    run = tmp_path / "peaked" / "ads-v0__hepo__0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": "hepo", "seed": 0, "init": "pre/ads-v0__0/vaft"}))
    values = [(0, 0.5), (1, None), (2, 0.4), (3, 0.7), (4, 0.7), (5, 0.6), (6, math.nan)]
    rows = [{"iteration": it, "train/loss": 0.1} if v is None else eval_row(it, v, v / 2) for it, v in values]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert keys.BEST_METRIC == selection.SELECT_METRIC  # one rule: what agents.hepo selects by
    assert folders.best_row(run)["iteration"] == 3
    best, last = (by_stage(tables.final_table([run], policy=p))["+HEPO"] for p in ("best", "last"))
    assert (best["iteration"], best["reward_per_session"]) == (3, 0.7)
    assert last["iteration"] == 6 and math.isnan(last["reward_per_session"])
    assert by_stage(tables.table3([run], policy="best"))["+HEPO"]["ndcg"] == pytest.approx(0.35)
    # the fixture's runs have their highest reward last, so best and last agree there
    for table in (tables.final_table, tables.table3):
        pd.testing.assert_frame_equal(table(runs, policy="best"), table(runs))
    files = plots.main([str(run), "--out", str(tmp_path / "report"), "--policy", "best"])
    assert pd.read_csv(files["final_table.csv"]).loc[1, "reward_per_session"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="policy='first' is invalid"):
        tables.final_table([run], policy="first")
    nan_only = tmp_path / "nan_only"
    nan_only.mkdir()
    (nan_only / "metrics.jsonl").write_text(json.dumps(eval_row(0, math.nan, 0.1)) + "\n")
    with pytest.raises(ValueError, match="no evaluation with a finite 'eval/reward_per_session'"):
        folders.best_row(nan_only)


def test_best_row_is_the_one_the_run_logged_it_chose(tmp_path):
    """A run that logs ``eval/best_iteration`` (agents.hepo, any --best-rule) is reported at that evaluation,
    not at its highest; an iteration that names no evaluation is an error."""
    run = tmp_path / "resolved" / "ads-v0__hepo__0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"algo": "hepo", "seed": 0, "init": "pre/ads-v0__0/vaft"}))

    def rows(chosen):
        values = ((0, 0.5), (2, 0.8), (4, 0.85))
        return [{**eval_row(it, v, v / 2), keys.BEST_ITERATION: c} for (it, v), c in zip(values, chosen)]

    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows((0, 2, 2))))
    assert folders.best_row(run)["iteration"] == 2  # the rule kept 2 though 4 is higher
    assert by_stage(tables.final_table([run], policy="best"))["+HEPO"]["reward_per_session"] == 0.8
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows((0, 2, 3))))
    with pytest.raises(ValueError, match="eval/best_iteration 3 names no evaluation"):
        folders.best_row(run)


def test_bad_folders_raise(runs, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="not_a_run"):
        tables.table3([*runs, empty])
    with pytest.raises(ValueError, match=r"no metrics.jsonl\): .*not_a_run"):
        plots.main([str(runs[0]), str(empty), "--out", str(tmp_path / "o")])
    (empty / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "train/loss": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no evaluation rows"):
        tables.final_table([empty])
    with pytest.raises(ValueError, match="no run folders"):
        tables.final_table([])
    for level in (
        "nan",
        "inf",
        "1.0",
        "0",
    ):  # a coverage strictly inside (0, 1), refused before any folder is read
        with pytest.raises(ValueError, match="level"):
            plots.main([str(runs[0]), "--level", level, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="runs"):
        plots.Args(runs=())
    assert plots.parse_args([str(runs[0]), "--level", "0.9"]) == plots.Args((str(runs[0]),), level=0.9)


def test_pretrain_table_and_plot_chain_vaft_after_mtp(tmp_path):
    def stage(name, init, hit):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"stage": name, "top_k": 10, "init": init}))
        rows = [
            {
                "step": s,
                "eval/loss": 4.0 - h,
                "eval/hitrate@10": h,
                "eval/ndcg@10": h / 2,
                "eval/pop_hitrate@10": 0.2,
                "eval/pop_ndcg@10": 0.1,
            }
            for s, h in zip((0, 5, 10), hit)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    mtp = stage("mtp", "", (0.0, 0.1, 0.3))
    vaft = stage("vaft", str(mtp / "checkpoint.pt"), (0.3, 0.35, 0.4))
    assert figures.step_offsets([mtp, vaft]) == {mtp: 0, vaft: 10}  # VAFT continues MTP's 10 steps
    table = tables.pretrain_table([mtp, vaft])
    assert list(table["stage"]) == ["mtp", "vaft"]
    assert table.loc[0, "hitrate@10_end"] == 0.3 and table.loc[1, "eval_loss_end"] == pytest.approx(3.6)
    assert table.loc[1, "pop_hitrate@10"] == 0.2
    path = figures.plot_pretrain([mtp, vaft], tmp_path / "p" / "pretrain.png")
    assert path.stat().st_size > 0


# ----------------------------------------------------------------------------- Table 4

START3 = {0: (0.5, 0.30), 1: (0.7, 0.40), 2: (1.0, 0.20)}
HEPO3 = {0: (1.0, 0.40), 1: (0.7, 0.50), 2: (1.5, 0.30)}
"""three seeds: HEPO reward vs VAFT of the same seed: 1.0 / 0.5 - 1 = 1.0, 0.7 / 0.7 - 1 = 0, 1.5 / 1.0 - 1 = 0.5"""
CASCADE = {
    "reward_per_session": (0.8, 0.7, 0.9),
    "ctr": (0.06, 0.06, 0.06),
    "cvr": (0.05, 0.04, 0.06),
    "ctcvr": (0.01, 0.009, 0.011),
    "gmv_per_session": (2.0, 1.5, 2.5),
    "revenue_per_session": (0.4, 0.3, 0.5),
}
"""the cascade's (value, ci_low, ci_high) per metric; CTR's CI has zero width"""


@pytest.fixture
def runs3(tmp_path):
    return [make_run(tmp_path / "runs3", "hepo", s, START3[s], HEPO3[s]) for s in (0, 1, 2)]


def make_baseline(folder, agents=("random", "cascade-privileged"), level=0.95, **config):
    """An agents.evaluate output folder: summary.json with one row per agent (random: all 0) and config.json."""
    folder.mkdir(parents=True)
    rows = {}
    for agent in agents:
        row = {"agent": agent, "eval/sessions": 256, "eval/roi": None}
        for m, (v, lo, hi) in CASCADE.items():
            row.update(
                {f"eval/{m}": v, f"eval/{m}_ci_low": lo, f"eval/{m}_ci_high": hi}
                if agent == "cascade-privileged"
                else {f"eval/{m}": 0.0, f"eval/{m}_ci_low": 0.0, f"eval/{m}_ci_high": 0.0}
            )
        rows[agent] = row
    (folder / "summary.json").write_text(json.dumps(rows))
    cfg = {
        "env": "ads-v0",
        "preset": "small",
        "world_seed": 0,
        "num_envs": 128,
        "sessions": 256,
        "seed": 12345,
        "level": level,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_table4_vs_previous_is_paired_by_seed(runs3):
    t = by_stage(tables.table4(runs3))
    assert list(t) == ["VAFT", "+HEPO"] and t["+HEPO"]["prev"] == "VAFT" and t["VAFT"]["prev"] == ""
    h = t["+HEPO"]
    # reward deltas 1.0, 0.0, 0.5: mean 0.5, s = 0.5, half = 4.303 * 0.5 / sqrt(3) = 1.2422
    # (unpaired, mean over mean: 3.2 / 2.2 - 1 = 0.4545)
    assert h["reward_per_session_vs_prev"] == pytest.approx(0.5)
    assert h["reward_per_session_vs_prev_ci_high"] == pytest.approx(0.5 + 1.2422, abs=1e-3)
    assert h["reward_per_session_vs_prev_ci_low"] == pytest.approx(0.5 - 1.2422, abs=1e-3)
    # GMV = 2 reward and revenue = reward / 2: the same relative changes
    assert h["gmv_per_session_vs_prev"] == pytest.approx(0.5) and h[
        "revenue_per_session_vs_prev"
    ] == pytest.approx(0.5)
    # CTR = 0.05 + reward / 100: 0.060 / 0.055 - 1, 0.057 / 0.057 - 1, 0.065 / 0.060 - 1
    # = 0.090909, 0, 0.083333: mean 0.058081, s = 0.050440, half = 4.303 * s / sqrt(3) = 0.125310
    assert h["ctr_vs_prev"] == pytest.approx(0.058081, abs=1e-6)
    assert h["ctr_vs_prev_ci_high"] - h["ctr_vs_prev"] == pytest.approx(0.125310, abs=1e-4)
    # CVR = cand / 10: 0.04 / 0.03 - 1, 0.05 / 0.04 - 1, 0.03 / 0.02 - 1 = 1/3, 1/4, 1/2: mean 0.361111
    assert h["cvr_vs_prev"] == pytest.approx(0.361111, abs=1e-6)
    # absolute values as in final_table: reward 1.0, 0.7, 1.5 -> mean 1.066667
    assert h["reward_per_session"] == pytest.approx(3.2 / 3) and h["n"] == 3 and h["iteration"] == 2
    v = t["VAFT"]
    assert math.isnan(v["reward_per_session_vs_prev"]) and v["reward_per_session"] == pytest.approx(2.2 / 3)


def test_table4_vs_cascade_combines_seed_and_cascade_intervals(runs3, tmp_path):
    t = by_stage(tables.table4(runs3, make_baseline(tmp_path / "base")))
    assert list(t) == ["cascade-privileged", "VAFT", "+HEPO"]
    c = t["cascade-privileged"]
    assert c["reward_per_session"] == 0.8 and c["reward_per_session_ci_low"] == 0.7 and pd.isna(c["n"])
    h = t["+HEPO"]
    # reward x = 1.0, 0.7, 1.5 vs cascade 0.8 [0.7, 0.9]: R = 1.066667 / 0.8 = 1.333333, r = 0.333333
    # se_ref = 0.2 / (2 * 1.959964) = 0.051021; a = s^2 / (n c^2) = 0.163333 / (3 * 0.64) = 0.085069
    # b = (R se_ref / c)^2 = (1.333333 * 0.051021 / 0.8)^2 = 0.007231; se = sqrt(0.092300) = 0.303809
    # df = 2 * (0.092300 / 0.085069)^2 = 2.3546: half = t(0.975, 2.3546) * 0.303810 = 3.7378 * 0.303810 = 1.135586
    assert h["reward_per_session_vs_cascade-privileged"] == pytest.approx(1 / 3)
    assert h["reward_per_session_vs_cascade-privileged_ci_high"] == pytest.approx(1 / 3 + 1.135586, abs=1e-5)
    assert h["reward_per_session_vs_cascade-privileged_ci_low"] == pytest.approx(1 / 3 - 1.135586, abs=1e-5)
    # an exact cascade (CTR: zero-width CI) leaves the t interval over seeds of x / c - 1
    mean, lo, hi = t_interval([(0.05 + r / 100) / 0.06 - 1 for r in (1.0, 0.7, 1.5)])[:3]
    assert h["ctr_vs_cascade-privileged"] == pytest.approx(mean)
    assert (h["ctr_vs_cascade-privileged_ci_low"], h["ctr_vs_cascade-privileged_ci_high"]) == pytest.approx(
        (lo, hi)
    )
    # the cascade's CI level comes from its config.json
    h90 = by_stage(tables.table4(runs3, make_baseline(tmp_path / "base90", level=0.9)))["+HEPO"]
    want = relative_change([1.0, 0.7, 1.5], 0.8, 0.7, 0.9, ref_level=0.9).ci_high
    assert h90["reward_per_session_vs_cascade-privileged_ci_high"] == pytest.approx(want)
    assert abs(want - h["reward_per_session_vs_cascade-privileged_ci_high"]) > 1e-2
    # without a baseline the cascade columns are absent; with one the paired columns do not change
    assert "reward_per_session_vs_cascade-privileged" not in tables.table4(runs3)
    assert h["reward_per_session_vs_prev"] == pytest.approx(0.5)


def test_table4_single_seed_has_values_but_no_intervals(runs3, tmp_path):
    t = by_stage(tables.table4(runs3[:1], make_baseline(tmp_path / "base")))
    h = t["+HEPO"]
    assert h["n"] == 1 and h["reward_per_session_vs_prev"] == pytest.approx(1.0)
    assert math.isnan(h["reward_per_session_vs_prev_ci_low"]) and math.isnan(
        h["reward_per_session_vs_prev_ci_high"]
    )
    assert h["reward_per_session_vs_cascade-privileged"] == pytest.approx(1.0 / 0.8 - 1)
    assert math.isnan(h["reward_per_session_vs_cascade-privileged_ci_low"])
    md = tables.table4_markdown(tables.table4(runs3[:1], tmp_path / "base"))
    # reward (last column): +100% vs VAFT, 1.0 / 0.8 - 1 = +25% vs cascade, each without an interval
    assert re.search(r"\| \+HEPO \| 1 \| \+9\.09% \|.* \| \+100\.00% \|\n", md)
    assert re.search(r"\| \+HEPO \| 1 \| \+0\.00% \|.* \| \+25\.00% \|\n", md) and "nan" not in md


def test_table4_baseline_without_cascade_raises(runs3, tmp_path):
    base = make_baseline(tmp_path / "base", agents=("random", "oracle"))
    with pytest.raises(
        ValueError, match=r"summary.json has no 'cascade-privileged' row \(agents: random, oracle\)"
    ):
        tables.table4(runs3, base)
    with pytest.raises(ValueError, match="no 'cascade-privileged' row"):
        plots.main([*map(str, runs3), "--out", str(tmp_path / "o"), "--baseline", str(base)])
    with pytest.raises(ValueError, match="not an agents.evaluate output folder"):
        tables.table4(runs3, tmp_path / "missing")


def test_table4_warns_when_baseline_is_not_on_the_held_out_sessions(runs3, tmp_path):
    for run in runs3:  # agents.hepo config.json: the Evaluator's protocol in args
        cfg = json.loads((run / "config.json").read_text())
        args = {
            "env": "ads-v0",
            "preset": "small",
            "eval_seed": 12345,
            "eval_envs": 128,
            "eval_sessions": 256,
        }
        (run / "config.json").write_text(json.dumps({**cfg, "args": args}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables.table4(runs3, make_baseline(tmp_path / "same"))
    with pytest.warns(UserWarning, match=r"seed 0 \(runs: 12345\).*sessions_per_slot 4 \(runs: 2\)"):
        tables.table4(runs3, make_baseline(tmp_path / "other", seed=0, sessions=512))


def test_main_with_baseline_writes_table4(runs3, tmp_path):
    out = tmp_path / "report"
    files = plots.main(
        [*map(str, runs3), "--out", str(out), "--baseline", str(make_baseline(tmp_path / "base"))]
    )
    csv = pd.read_csv(files["table4.csv"])
    assert list(csv["stage"]) == ["cascade-privileged", "VAFT", "+HEPO"]
    assert csv.loc[2, "reward_per_session_vs_cascade-privileged"] == pytest.approx(1 / 3)
    md = files["table4.md"].read_text()
    # reward vs cascade: 1/3 +- 1.135586 (test above); CTR (first column) 0.060667 / 0.06 - 1 = +1.11%
    assert re.search(
        r"vs cascade-privileged.*\| \+HEPO \| 3 \| \+1\.11% \[.* \| \+33\.33% \[-80\.23%, \+146\.89%\] \|\n",
        md,
        re.S,
    )
    assert "| cascade-privileged |  | 0.06 [0.06, 0.06] |" in md


# ----------------------------------------------------------------------------- Table 5

SCALE = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "5": 5.0, "new": 0.25, "old": 0.75}
"""a group's metric i of a run with reward x is SCALE[group] * x + 0.01 i (i: index in TABLE5); sessions: below"""
SESSIONS = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "new": 15, "old": 15}
EMPTY = (0.7, 0.50)
"""the (reward, cand) of HEPO3's seed 1 final evaluation, whose tier 5 is empty: sessions 0, NaN metrics"""


def strata_row(it: int, reward: float, cand: float) -> dict:
    """``eval_row`` plus the per-stratum keys of the agents.hepo Evaluator (no reward for the ad-age groups)."""
    row = eval_row(it, reward, cand)
    for stratum, groups in keys.STRATA.items():
        for group in groups:
            empty = it > 0 and (reward, cand) == EMPTY and group == "5"
            row[keys.strata_key(stratum, group, "sessions")] = 0 if empty else SESSIONS[group]
            for i, m in enumerate(keys.TABLE5):
                if m in keys.STRATA_METRICS[stratum]:
                    row[keys.strata_key(stratum, group, m)] = (
                        math.nan if empty else SCALE[group] * reward + 0.01 * i
                    )
    return row


@pytest.fixture
def runs5(tmp_path):
    return [make_run(tmp_path / "runs5", "hepo", s, START3[s], HEPO3[s], strata_row) for s in (0, 1, 2)]


def make_baseline_strata(folder, agents=("random", "cascade-privileged")):
    """``make_baseline`` plus strata.csv: the cascade's group metric i is SCALE[group] + 0.01 i, CI +- 0.1."""
    make_baseline(folder, agents)
    rows = []
    for agent in agents:
        for stratum, groups in keys.STRATA.items():
            for group in groups:
                row = {
                    "agent": agent,
                    "stratum": stratum,
                    "group": group,
                    "eval/sessions": 10 * SESSIONS[group],
                }
                for i, m in enumerate(keys.TABLE5):
                    v = SCALE[group] + 0.01 * i if agent == "cascade-privileged" else 0.0
                    if m not in keys.STRATA_METRICS[stratum]:
                        v = math.nan  # agents.evaluate: the ad-age groups have no reward column values
                    row.update({f"eval/{m}": v, f"eval/{m}_ci_low": v - 0.1, f"eval/{m}_ci_high": v + 0.1})
                rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "strata.csv", index=False)
    return folder


def test_table5_means_and_seed_intervals_per_stratum_with_cascade_rows(runs5, tmp_path):
    t = tables.table5(runs5, make_baseline_strata(tmp_path / "base"))
    stages = ["cascade-privileged", "VAFT", "+HEPO"]
    want = [(s, g, st) for s, gs in keys.STRATA.items() for g in gs for st in stages]
    assert list(zip(t["stratum"], t["group"], t["stage"])) == want
    row = {(r["stratum"], r["group"], r["stage"]): r for _, r in t.iterrows()}
    # +HEPO: rewards 1.0, 0.7, 1.5: mean 1.066667, s = 0.404145, half = 4.303 * s / sqrt(3) = 1.003955;
    # tier 3 CTR (i = 0) = 3 x: mean 3.2, half 3 * 1.003955 = 3.011865
    h = row["activity_tier", "3", "+HEPO"]
    assert h["n"] == 3 and h["iteration"] == 2 and h["sessions"] == 3
    assert h["ctr"] == pytest.approx(3.2)
    assert (h["ctr_ci_low"], h["ctr_ci_high"]) == pytest.approx((3.2 - 3.011865, 3.2 + 3.011865), abs=2e-3)
    # tier 2 reward (i = 5): 2 x + 0.05: mean 2.183333, half 2.007910
    h = row["activity_tier", "2", "+HEPO"]
    assert h["reward_per_session"] == pytest.approx(2 * 3.2 / 3 + 0.05)
    assert h["reward_per_session_ci_high"] - h["reward_per_session"] == pytest.approx(2.007910, abs=2e-3)
    # old ads GMV (i = 3): 0.75 x + 0.03: mean 0.83, half 0.75 * 1.003955 = 0.752966; no reward for ad age
    o = row["ad_age", "old", "+HEPO"]
    assert o["gmv_per_session"] == pytest.approx(0.83) and o["sessions"] == 15
    assert o["gmv_per_session_ci_low"] == pytest.approx(0.83 - 0.752966, abs=1e-3)
    assert math.isnan(o["reward_per_session"]) and math.isnan(o["reward_per_session_ci_low"])
    # VAFT: iteration-0 rewards 0.5, 0.7, 1.0 over the three generators: mean 0.733333, s = 0.251661,
    # half = 4.303 * s / sqrt(3) = 0.625212; new ads CVR (i = 1) = 0.25 x + 0.01: mean 0.193333, half 0.156303
    v = row["ad_age", "new", "VAFT"]
    assert v["n"] == 3 and v["iteration"] == 0
    assert v["cvr"] == pytest.approx(0.25 * 2.2 / 3 + 0.01)
    assert v["cvr_ci_high"] - v["cvr"] == pytest.approx(0.156303, abs=1e-3)
    # an empty group in one seed (tier 5 of seed 1's final evaluation): NaN, sessions averaged with its 0
    e = row["activity_tier", "5", "+HEPO"]
    assert math.isnan(e["ctr"]) and e["sessions"] == pytest.approx(10 / 3)
    assert row["activity_tier", "5", "VAFT"]["ctr"] == pytest.approx(5 * 2.2 / 3)
    # the cascade: strata.csv's cascade row (not random's), its CI over sessions; tier 4 CVR (i = 1) = 4.01
    c = row["activity_tier", "4", "cascade-privileged"]
    assert (c["cvr"], c["cvr_ci_low"], c["cvr_ci_high"]) == pytest.approx((4.01, 3.91, 4.11))
    assert c["sessions"] == 40 and pd.isna(c["n"]) and pd.isna(c["iteration"])
    assert math.isnan(row["ad_age", "new", "cascade-privileged"]["reward_per_session"])
    # without a baseline: no cascade rows, the same stage values
    t0 = tables.table5(runs5)
    assert "cascade-privileged" not in set(t0["stage"]) and len(t0) == 14
    assert t0["ctr"].equals(t[t["stage"] != "cascade-privileged"]["ctr"].reset_index(drop=True))


def test_table5_single_seed_has_values_but_no_intervals(runs5):
    t = tables.table5(runs5[:1])
    h = t[(t["group"] == "1") & (t["stage"] == "+HEPO")].iloc[0]
    assert h["n"] == 1 and h["ctr"] == pytest.approx(1.0) and math.isnan(h["ctr_ci_low"])
    md = tables.table5_markdown(t)
    assert "| 1 | +HEPO | 1 | 1 | 1 | 1.01 |" in md and "nan" not in md


def test_table5_rejects_runs_without_strata(runs5, runs, tmp_path):
    with pytest.raises(ValueError, match=r"no per-stratum evaluations .*ads-v0__ppo__0"):
        tables.table5([*runs5, runs[2]])  # runs: folders written before the Evaluator logged strata
    assert folders.runs_without_strata(runs5) == [] and folders.runs_without_strata(runs[:2]) == runs[:2]
    with pytest.raises(ValueError, match="no strata.csv"):
        tables.table5(runs5, make_baseline(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"strata.csv has no 'cascade-privileged' rows \(agents: random\)"):
        folders.read_baseline_strata(make_baseline_strata(tmp_path / "random", agents=("random",)))
    # the report leaves table5 out with a warning when only some runs have strata (none: silently, as before)
    with pytest.warns(UserWarning, match="table5 not written.*ads-v0__ppo__0"):
        files = report.write_report([*runs5, runs[2]], tmp_path / "mixed")
    assert "table5.csv" not in files and not (tmp_path / "mixed" / "table5.csv").exists()


def test_main_writes_table5(runs5, tmp_path):
    out = tmp_path / "report"
    files = plots.main(
        [*map(str, runs5), "--out", str(out), "--baseline", str(make_baseline_strata(tmp_path / "b"))]
    )
    assert files["table5.csv"] == out / "table5.csv" and files["table5.md"] == out / "table5.md"
    csv = pd.read_csv(out / "table5.csv", dtype={"group": str})
    assert len(csv) == 21 and csv.loc[csv["group"] == "3", "ctr"].tolist() == pytest.approx([3.0, 2.2, 3.2])
    md = (out / "table5.md").read_text()
    blocks = md.split("\n\n")
    tiers = next(b for b in blocks if b.startswith("| activity_tier | stage | n | sessions | ctr |"))
    ages = next(b for b in blocks if b.startswith("| ad_age | stage | n | sessions | ctr |"))
    assert "reward_per_session" in tiers and "reward_per_session" not in ages
    # tier 3 CTR: 3.2 +- 3.011865 (test above); cascade 3.00 [2.90, 3.10] over its 30 sessions
    assert "| 3 | +HEPO | 3 | 3 | 3.2 [0.1881, 6.212] |" in tiers
    assert "| 3 | cascade-privileged |  | 30 | 3 [2.9, 3.1] |" in tiers
    assert "| 5 | +HEPO | 3 | 3.333 | n/a |" in tiers and "nan" not in md
    assert len(ages.splitlines()) == 2 + 2 * 3  # header, rule, (cascade, VAFT, +HEPO) x (new, old)


def test_reward_model_figure_draws_rewarded_and_true_values(tmp_path, monkeypatch):
    """Runs that log the reward model's monitor get ``reward_model.png``: per algorithm the rewarded value
    (solid) and the true value (dashed) of the sampled candidates, seed means, and their correlation; runs
    without it get no figure (``test_main_writes_every_file``)."""

    def run(seed: int, rewarded: list[float], truth: list[float]):
        folder = tmp_path / "runs" / f"ads-v0__hepo__{seed}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"algo": "hepo", "seed": seed, "env": "ads-v0"}))
        rows = [
            {
                "iteration": i + 1,
                "env_steps": 16 * (i + 1),
                keys.REWARD_MODEL[0]: r,
                keys.REWARD_MODEL[1]: t,
                keys.REWARD_MODEL[2]: 0.5 - 0.1 * i,
            }
            for i, (r, t) in enumerate(zip(rewarded, truth))
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    runs = [run(0, [0.30, 0.40, 0.50], [0.20, 0.15, 0.10]), run(1, [0.32, 0.42, 0.48], [0.22, 0.17, 0.08])]
    figs = []
    monkeypatch.setattr(figures, "figure_bytes", lambda fig, dpi: figs.append(fig) or b"png")
    assert figures.plot_reward_model(runs, tmp_path / "reward_model.png").name == "reward_model.png"
    left, right = figs[0].axes
    solid, dashed = left.get_lines()
    assert solid.get_linestyle() == "-" and dashed.get_linestyle() == "--"
    assert np.allclose(solid.get_ydata(), [0.31, 0.41, 0.49]) and np.allclose(
        dashed.get_ydata(), [0.21, 0.16, 0.09]
    )
    assert np.allclose(right.get_lines()[0].get_ydata(), [0.5, 0.4, 0.3])
    plt.close("all")
    old = make_run(tmp_path / "old", "hepo", 0, (0.5, 0.3), (1.0, 0.4))
    assert (
        figures.plot_reward_model([old], tmp_path / "old.png") is None and not (tmp_path / "old.png").exists()
    )


def test_gradients_figure_draws_policy_and_critic_norms_and_the_clip(tmp_path, monkeypatch):
    """Runs that log the update's gradient norms get ``gradients.png``: per algorithm the policy's norm (solid) and
    the critic's (dashed), seed means, the shared clip limit as a line, and the share of clipped minibatches; runs
    without them get no figure."""

    def run(seed: int, policy: list[float], critic: list[float], clipped: list[float]):
        folder = tmp_path / "runs" / f"ads-v0__hepo__{seed}"
        folder.mkdir(parents=True)
        args = {"max_grad_norm": 1.0, "grad_clip": "separate"}  # agents.hepo's flags
        config = {"algo": "hepo", "seed": seed, "env": "ads-v0", "args": args}
        (folder / "config.json").write_text(json.dumps(config))
        rows = [
            {"iteration": i + 1, "env_steps": 16 * (i + 1), **dict(zip(keys.GRADIENTS, values))}
            for i, values in enumerate(zip(policy, critic, clipped))
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    runs = [run(0, [0.5, 0.7], [8.0, 4.0], [0.0, 0.5]), run(1, [0.7, 0.9], [6.0, 2.0], [0.5, 1.0])]
    figs = []
    monkeypatch.setattr(figures, "figure_bytes", lambda fig, dpi: figs.append(fig) or b"png")
    assert figures.plot_gradients(runs, tmp_path / "gradients.png").name == "gradients.png"
    left, right = figs[0].axes
    policy, critic, limit = left.get_lines()
    assert policy.get_linestyle() == "-" and critic.get_linestyle() == "--"
    assert np.allclose(policy.get_ydata(), [0.6, 0.8]) and np.allclose(critic.get_ydata(), [7.0, 3.0])
    assert np.allclose(limit.get_ydata(), [1.0, 1.0]) and "separate" in limit.get_label()
    assert np.allclose(right.get_lines()[0].get_ydata(), [0.25, 0.75])
    plt.close("all")
    old = make_run(tmp_path / "old", "hepo", 0, (0.5, 0.3), (1.0, 0.4))
    assert figures.plot_gradients([old], tmp_path / "old.png") is None and not (tmp_path / "old.png").exists()


def test_update_gradients_average_the_policy_updates_only(tmp_path):
    """A run's gradients for the sweep's table: the mean over the iterations that stepped the policy (the critic
    warm-up's rows, with no policy gradient, left out); NaN for a run from before they were logged."""
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [
        {
            "iteration": 1,
            "train/grad_norm_policy": 0.0,
            "train/grad_norm_critic": 9.0,
            "train/grad_clipped": 0.0,
        },
        {
            "iteration": 2,
            "train/grad_norm_policy": 0.5,
            "train/grad_norm_critic": 4.0,
            "train/grad_clipped": 1.0,
        },
        {
            "iteration": 3,
            "train/grad_norm_policy": 1.5,
            "train/grad_norm_critic": 2.0,
            "train/grad_clipped": 0.5,
        },
        {"iteration": 4, "eval/oracle_share": 0.4},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = folders.update_gradients(folder)
    assert got == {"grad_norm_policy": 1.0, "grad_norm_critic": 3.0, "grad_clipped": 0.75}
    old = make_run(tmp_path / "old", "hepo", 0, (0.5, 0.3), (1.0, 0.4))
    assert all(math.isnan(v) for v in folders.update_gradients(old).values())
