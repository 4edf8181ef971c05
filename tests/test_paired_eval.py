"""Paired online evaluation (agents.evaluation.paired, agents.evaluate --reference): sessions paired by
(slot, session), the paired difference and its interval against hand computations, variance reduction where
pairing must help, the files, the reference check and the cache."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from agents import cli
from agents.evaluate import Args, main
from agents.evaluation.compare import EvalConfig, agent_dir, compare_agents
from agents.evaluation.paired import (
    COLUMNS,
    STATE_METRIC,
    difference_row,
    pair_sessions,
    paired_table,
    stream_start,
)
from agents.evaluation.sessions import collect_sessions
from agents.policies import make_policy
from envs import make_vec_env
from gpr_sim.metrics import METRICS, Metric
from gpr_sim.stats import paired_difference, paired_ratio_difference, welch_interval, welch_ratio_difference

torch.set_num_threads(1)
TINY = dict(num_envs=24, sessions=48, oracle_states=32)  # 2 sessions per env slot


@pytest.fixture(scope="module")
def tiny_paired(tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    summary = main(
        Args(agents="random,cascade-privileged,oracle", reference="cascade-privileged", out=str(out), **TINY)
    )
    return out, summary


def _sessions(out, agent):
    return pd.read_parquet(agent_dir(out, agent) / "sessions.parquet")


def test_files_and_columns(tiny_paired):
    out, _ = tiny_paired
    table = pd.read_csv(out / "paired.csv")
    assert list(table.columns) == list(COLUMNS)
    names = [m.name for m in METRICS] + [STATE_METRIC.name]
    assert list(table.agent) == ["random"] * len(names) + ["oracle"] * len(names)  # comparison order
    assert list(table.metric) == names * 2 and (table.reference == "cascade-privileged").all()
    sessions = table[table.metric != STATE_METRIC.name]
    assert (sessions.pairs == 48).all() and (table[table.metric == STATE_METRIC.name].pairs == 32).all()
    doc = json.loads((out / "paired.json").read_text())
    assert doc["level"] == 0.95 and set(doc["agents"]) == {"random", "oracle"}
    assert doc["agents"]["oracle"]["ctr"]["difference"] == pytest.approx(
        table.set_index(["agent", "metric"]).loc[("oracle", "ctr"), "difference"]
    )
    assert (out / "paired.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_difference_is_the_difference_of_the_means(tiny_paired):
    """On the paired sessions the paired and the unpaired difference have one point estimate, the difference
    of the agents' summary values: exactly for the per-session means (the same sums in the same order)."""
    out, summary = tiny_paired
    table = pd.read_csv(out / "paired.csv").set_index(["agent", "metric"])
    rows = summary.set_index("agent")
    ref = _sessions(out, "cascade-privileged")
    for agent in ("random", "oracle"):
        mine = _sessions(out, agent)
        for m in METRICS:
            r = table.loc[(agent, m.name)]
            expected = rows.loc[agent, f"eval/{m.name}"] - rows.loc["cascade-privileged", f"eval/{m.name}"]
            if m.denominator is None:
                x, y = mine[m.numerator].to_numpy(float), ref[m.numerator].to_numpy(float)
                assert r.difference == x.mean() - y.mean() == expected, m.name  # bit for bit
                p, w = paired_difference(x, y), welch_interval(x, y)  # the textbook intervals agree
                assert (r.ci_low, r.ci_high) == pytest.approx((p.ci_low, p.ci_high), rel=1e-12), m.name
                assert (r.unpaired_ci_low, r.unpaired_ci_high) == pytest.approx((w.ci_low, w.ci_high)), m.name
            else:
                assert r.difference == pytest.approx(expected, rel=1e-12, abs=1e-15), m.name
            if math.isfinite(r.ci_low):
                assert r.ci_low <= r.difference <= r.ci_high, m.name
                assert r.unpaired_ci_low <= r.difference <= r.unpaired_ci_high, m.name


def test_first_sessions_and_equal_stream_starts_share_the_user(tiny_paired):
    out, _ = tiny_paired
    a, b = pair_sessions(_sessions(out, "random"), _sessions(out, "cascade-privileged"))
    first = a.session == 0
    assert (a.stream_start[first] == 0).all() and (a.user_id[first] == b.user_id[first]).all()
    same = a.stream_start == b.stream_start
    assert same.sum() > first.sum()  # some second sessions start at the same draw (equal first lengths)
    assert (a.user_id[same] == b.user_id[same]).all()  # ... and so draw the same user
    table = pd.read_csv(out / "paired.csv")
    assert (table[table.metric == "ctr"].same_streams.to_numpy() > 24).all()


def test_stream_start_by_hand():
    # slot 0 lengths 3, 5, 2: starts 0, 0 + 3 + 1 = 4, 4 + 5 + 1 = 10; slot 1 lengths 30, 1: starts 0, 31.
    # The rows come shuffled: the starts follow (slot, session), not the row order.
    df = pd.DataFrame({"slot": [1, 0, 0, 1, 0], "session": [1, 2, 0, 0, 1], "length": [1, 2, 3, 30, 5]})
    assert stream_start(df).tolist() == [31, 10, 0, 0, 4]
    assert stream_start(df.set_index(pd.Index([7, 7, 7, 8, 8]))).tolist() == [31, 10, 0, 0, 4]  # any index


def test_interval_of_a_tiny_table_by_hand():
    # ctr = clicks / impressions over 3 paired sessions:
    #   x: clicks 1, 0, 2 / impressions 2, 1, 3 -> R_x = 3 / 6 = 0.5
    #   y: clicks 1, 1, 1 / impressions 1, 2, 3 -> R_y = 3 / 6 = 0.5
    # influence (num - R den) / mean(den) = /2: x (0, -0.25, 0.25), y (0.25, 0, -0.25)
    # paired: phi = x - y = (-0.25, -0.25, 0.5), var = 0.1875, se = sqrt(0.1875 / 3) = 0.25,
    #   half = t_{0.975, 2} 0.25 = 4.302653 x 0.25 = 1.075663
    # unpaired: var_x = var_y = 0.0625, se^2 = 2 x 0.0625 / 3 = 0.041667 (se 0.204124),
    #   Welch df = (2 v)^2 / (2 v^2 / 2) = 4, half = t_{0.975, 4} se = 2.776445 x 0.204124 = 0.566739
    # variance reduction = 0.041667 / 0.0625 = 2/3 (negatively correlated pairs: pairing costs)
    x = pd.DataFrame(
        {"slot": [0, 1, 2], "session": 0, "length": 1, "clicks": [1, 0, 2], "impressions": [2, 1, 3]}
    )
    y = pd.DataFrame(
        {"slot": [2, 0, 1], "session": 0, "length": 1, "clicks": [1, 1, 1], "impressions": [3, 1, 2]}
    )
    a, b = pair_sessions(x, y)  # y's rows come shuffled: pairing is by key
    r = difference_row(a, b, Metric("ctr", "clicks", "impressions"), 0.95)
    assert r["value"] == r["reference_value"] == 0.5 and r["difference"] == 0.0
    assert r["std_err"] == pytest.approx(0.25, rel=1e-12)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((-1.075663, 1.075663), abs=1e-6)
    assert r["unpaired_std_err"] == pytest.approx(math.sqrt(2 * 0.0625 / 3), rel=1e-12)
    assert (r["unpaired_ci_low"], r["unpaired_ci_high"]) == pytest.approx((-0.566739, 0.566739), abs=1e-6)
    assert r["variance_reduction"] == pytest.approx(2 / 3, rel=1e-12)
    # a mean: clicks per session, d = (0, -1, 1): mean 0, var 1, se = 1 / sqrt(3), half = 4.302653 / sqrt(3)
    r = difference_row(a, b, Metric("clicks_per_session", "clicks"), 0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((-2.484138, 2.484138), abs=1e-6)
    # the scale multiplies value and interval (eCPM): 1000 x the ratio's numbers
    scaled = difference_row(a, b, Metric("ecpm", "clicks", "impressions", 1000.0), 0.95)
    assert scaled["ci_high"] == pytest.approx(1075.663, abs=1e-3) and scaled[
        "variance_reduction"
    ] == pytest.approx(2 / 3)


def test_ratio_differences_reduce_to_the_mean_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.8 * x + rng.normal(size=40)
    p, w = paired_ratio_difference(x, None, y, None), welch_ratio_difference(x, None, y, None)
    assert p[:4] == pytest.approx(paired_difference(x, y)[:4], rel=1e-12)
    assert w[:4] == pytest.approx(welch_interval(x, y)[:4], rel=1e-12)
    with pytest.raises(ValueError, match="one length"):
        paired_ratio_difference(x, None, y[:-1], None)


def test_paired_ratio_interval_covers_at_its_level():
    """Coverage of the paired delta-method interval of a CTR-like difference on correlated pairs: 2000 seeded
    replications of 200 units, each unit a user with click probability p ~ Beta(2, 18) seen by both agents (x
    clicks with p, y with 0.8 p) on den ~ 1 + Poisson(5) impressions; den is independent of p, so the true
    difference is E[p] - 0.8 E[p] = 0.1 - 0.08 = 0.02. Nominal 95%, tolerance 3 binomial sds
    (sqrt(0.95 x 0.05 / 2000) = 0.0049). The unpaired interval ignores the shared p: it is wider on average."""
    rng = np.random.default_rng(0)
    covered, paired_width, unpaired_width = 0, 0.0, 0.0
    for _ in range(2000):
        p, den = rng.beta(2, 18, 200), rng.poisson(5, 200) + 1
        x, y = rng.binomial(den, p), rng.binomial(den, 0.8 * p)
        e, w = paired_ratio_difference(x, den, y, den), welch_ratio_difference(x, den, y, den)
        covered += e.ci_low <= 0.02 <= e.ci_high
        paired_width += e.ci_high - e.ci_low
        unpaired_width += w.ci_high - w.ci_low
    assert covered / 2000 == pytest.approx(0.95, abs=3 * 0.0049)
    assert paired_width < unpaired_width


def test_pairing_reduces_the_variance_where_the_pairs_share_most():
    """The cascade at temperature 0.30 against itself at 0.33, with the same policy seed, on the same market.

    Why pairing must help here (by construction, not by a measured margin): both runs reset with one seed,
    so every slot's first session has the same user and the same world draws; both cascades score the same
    ads and sample their lists from the same uniforms (one draw per candidate per step, whatever the
    temperature), so they serve the same ads except where a 10% change of temperature reorders a sample.
    Most pairs are then the same session, the agents' sessions covary strongly (Cov > 0), and
    Var(x - y) = Var(x) + Var(y) - 2 Cov(x, y) falls below the unpaired Var(x) + Var(y). The limit case, an
    agent against itself, has zero paired variance.
    """

    def run(temperature):
        env = make_vec_env("ads-v0", 64, preset="small", world_seed=0, validate_actions=False)
        policy = make_policy("cascade-privileged", env, seed=0, temperature=temperature)
        return collect_sessions(env, policy, 2, seed=0, progress=False)[0]

    a, b = pair_sessions(run(0.30), run(0.33))
    cols = ["length", "impressions", "clicks", "revenue", "reward", "user_id"]
    assert (a[a.session == 0].user_id == b[b.session == 0].user_id).all()
    assert (a[cols].to_numpy() == b[cols].to_numpy()).all(
        1
    ).mean() > 0.25  # the construction: many equal sessions
    for m in METRICS:
        if m.name in (
            "reward_per_session",
            "revenue_per_session",
            "session_length",
            "ctr",
            "clicks_per_session",
        ):
            r = difference_row(a, b, m, 0.95)
            assert r["variance_reduction"] > 1.0, m.name
            assert r["ci_high"] - r["ci_low"] < r["unpaired_ci_high"] - r["unpaired_ci_low"], m.name
    same = difference_row(a, a, Metric("reward_per_session", "reward"), 0.95)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0
    assert same["variance_reduction"] == math.inf and same["unpaired_std_err"] > 0


def test_reference_must_be_a_compared_agent(tmp_path, capsys):
    with pytest.raises(
        ValueError, match=r"reference='oracle' is not one of the compared agents: random,cascade-privileged"
    ):
        EvalConfig(agents=("random", "cascade-privileged"), reference="oracle")
    with pytest.raises(ValueError, match="needs at least one other agent"):
        EvalConfig(agents=("cascade-privileged",), reference="cascade-privileged")
    argv = ["--agents", "random,cascade-privileged", "--reference", "oracle", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference='oracle' is not one of the compared agents" in err[0], err
    assert not (tmp_path / "x").exists()  # refused before anything ran
    assert (
        EvalConfig(agents=("random", "cascade-privileged")).reference is None
    )  # no paired table unless asked


def test_paired_table_rejects_unpaired_records(tiny_paired):
    out, _ = tiny_paired
    a, b = _sessions(out, "random"), _sessions(out, "cascade-privileged")
    with pytest.raises(ValueError, match="different sessions"):
        pair_sessions(a, b[b.session == 0])
    with pytest.raises(ValueError, match="no pairing key column session"):
        pair_sessions(a.drop(columns="session"), b)
    with pytest.raises(ValueError, match="twice"):
        pair_sessions(pd.concat([a, a.iloc[:1]]), b)


def test_cache_without_pairing_key_is_run_again(tmp_path, capsys):
    cfg = EvalConfig(agents=("random", "cascade-privileged"), reference="cascade-privileged", **TINY)
    first = compare_agents(cfg, tmp_path)
    table = agent_dir(tmp_path, "random") / "sessions.parquet"
    expected = first.sessions["random"]
    # an older cache: the same run config, session rows without the (slot, session) key
    expected.drop(columns=["slot", "session"]).to_parquet(table, index=False)
    capsys.readouterr()
    again = compare_agents(cfg, tmp_path)
    printed = capsys.readouterr().out
    assert "random: " in printed and "cannot be paired (no column slot, session), running again" in printed
    assert "cascade-privileged: same config already evaluated" in printed
    pd.testing.assert_frame_equal(again.sessions["random"], expected)  # simulated again: the same sessions
    pd.testing.assert_frame_equal(pd.read_parquet(table), expected)
    # records that are not every slot's sessions 0..k-1 (one row lost) are not paired by guesswork either
    expected.iloc[1:].to_parquet(table, index=False)
    compare_agents(cfg, tmp_path)
    assert "not sessions 0..1 of slots 0..23, each once), running again" in capsys.readouterr().out
    pd.testing.assert_frame_equal(
        paired_table(again, "cascade-privileged"), paired_table(first, "cascade-privileged")
    )


def test_a_reference_on_fewer_sessions_pairs_on_each_slots_first(tiny_paired, tmp_path, capsys):
    """``sessions_of``: the oracle recorded on each slot's first session only is the longer run's first session
    (the same market, the same draws), and the paired table pairs it on those sessions alone."""
    out, _ = tiny_paired
    one = TINY["num_envs"]  # one session per slot
    cfg = EvalConfig(
        agents=("cascade-privileged", "oracle"),
        reference="cascade-privileged",
        sessions_of=(("oracle", one),),
        **TINY,
    )
    result = compare_agents(cfg, tmp_path)
    full = _sessions(out, "oracle")
    first = full[full.session == 0].sort_values("slot").reset_index(drop=True)
    pd.testing.assert_frame_equal(result.sessions["oracle"].sort_values("slot").reset_index(drop=True), first)
    assert len(result.sessions["cascade-privileged"]) == TINY["sessions"]  # the others keep every session
    table = paired_table(result, "cascade-privileged").set_index("metric")
    assert (table.loc["reward_per_session", ["pairs", "same_streams"]] == one).all()
    reference = _sessions(out, "cascade-privileged")
    a, b = pair_sessions(first, reference[reference.session == 0])
    want = difference_row(a, b, Metric("reward_per_session", "reward"), 0.95)
    got = table.loc["reward_per_session"]
    for key in ("difference", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key

    # cached only: reused with the same config; another config leaves it out, never simulated
    capsys.readouterr()
    again = compare_agents(dataclasses.replace(cfg, cached_only=("oracle",)), tmp_path)
    assert "oracle: same config already evaluated" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again.sessions["oracle"], result.sessions["oracle"])
    other = dataclasses.replace(cfg, sessions_of=(("oracle", 2 * one),), cached_only=("oracle",))
    left = compare_agents(other, tmp_path)
    assert "holds a run with another config, left out (cached only)" in capsys.readouterr().out
    assert set(left.sessions) == {"cascade-privileged"}
    assert list(left.summary["agent"]) == ["cascade-privileged"]
    elsewhere = compare_agents(dataclasses.replace(cfg, cached_only=("oracle",)), tmp_path / "empty")
    assert (
        "oracle: no sessions of this config" in capsys.readouterr().out and "oracle" not in elsewhere.sessions
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sessions_of=(("random", 24),)), "sessions_of names 'random', not one of the compared agents"),
        (
            dict(sessions_of=(("oracle", 0),)),
            r"sessions_of oracle=0 is out of range: expected an integer in \[1, ",
        ),
        (dict(sessions_of=(("oracle", 49),)), r"sessions_of oracle=49 is out of range"),
        (dict(sessions_of=(("oracle", 24), ("oracle", 24))), "sessions_of names an agent twice"),
        (dict(cached_only=("random",)), "cached_only names 'random', not one of the compared agents"),
        (dict(cached_only=("cascade-privileged",)), "is cached_only: the paired table needs it"),
    ],
)
def test_sessions_of_and_cached_only_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(agents=("cascade-privileged", "oracle"), reference="cascade-privileged", **kwargs, **TINY)


def test_sessions_of_flag_names_a_bad_entry_in_one_line(tmp_path, capsys):
    argv = ["--agents", "cascade-privileged,oracle", "--sessions-of", "oracle", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sessions_of entry 'oracle' is invalid: expected AGENT=N" in err[0], err
    assert not (tmp_path / "x").exists()
    args = Args(agents="cascade-privileged,oracle", sessions_of="oracle=8", cached_only="oracle", **TINY)
    assert args.config().sessions_of == (("oracle", 8),) and args.config().cached_only == ("oracle",)
