"""agents.evaluate and its library (agents.evaluation.compare): files and columns, agents ranked with confidence
intervals, determinism, resume, registry."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agents.evaluate import Args, main, parse_args
from agents.evaluation.compare import BUDGETS, EvalConfig, compare_agents, write_comparison
from agents.policies import FAMILIES, Family, PolicyOutput, make_policy, policy_factory
from envs import make_vec_env
from gpr_sim.metrics import METRICS, SESSION_COLUMNS
from gpr_sim.stats import CIConfig

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_envs=24, sessions=48, oracle_states=32)  # 2 sessions per env slot
METRIC_COLUMNS = [f"eval/{m.name}{x}" for m in METRICS for x in ("", "_ci_low", "_ci_high")]
ORACLE_COLUMNS = [
    f"eval/{k}{x}" for k in ("oracle_share", "oracle_fatigue_share") for x in ("", "_ci_low", "_ci_high")
] + ["eval/policy_value", "eval/oracle_value", "eval/oracle_states"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    summary = main(Args(agents="random,cascade-privileged,oracle", out=str(out), **TINY))
    return out, summary


def test_files_and_columns(tiny_run):
    out, summary = tiny_run
    for name in ("config.json", "summary.csv", "summary.json", "strata.csv"):
        assert (out / name).stat().st_size > 0
    for name in ("metrics.png", "strata.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    csv = pd.read_csv(out / "summary.csv")
    assert list(csv.columns) == ["agent", "eval/sessions"] + METRIC_COLUMNS + ORACLE_COLUMNS
    assert (
        list(csv.agent) == ["random", "cascade-privileged", "oracle"] and (csv["eval/sessions"] == 48).all()
    )
    assert set(json.loads((out / "summary.json").read_text())) == {"random", "cascade-privileged", "oracle"}
    strata = pd.read_csv(out / "strata.csv", dtype={"group": str})
    assert list(strata.columns[:4]) == ["agent", "stratum", "group", "eval/sessions"]
    assert len(strata) == 3 * 7
    assert list(strata[strata.agent == "oracle"].group) == ["1", "2", "3", "4", "5", "new", "old"]
    tiers = strata[strata.stratum == "activity_tier"].groupby("agent")["eval/sessions"].sum()
    assert (tiers == 48).all()  # the tiers partition the sessions

    first_users = []
    for agent, row in summary.set_index("agent").iterrows():
        sessions = pd.read_parquet(out / "agents" / agent / "sessions.parquet")
        assert list(sessions.columns) == list(SESSION_COLUMNS)
        assert (sessions.groupby("slot").size() == 2).all()
        # the summary is the ratio of session sums, inside its own interval
        assert row["eval/ctr"] == pytest.approx(sessions.clicks.sum() / sessions.impressions.sum())
        assert row["eval/revenue_per_session"] == pytest.approx(sessions.revenue.mean())
        for m in METRICS:
            v, lo, hi = row[f"eval/{m.name}"], row[f"eval/{m.name}_ci_low"], row[f"eval/{m.name}_ci_high"]
            assert lo <= v <= hi, m.name
        first_users.append(sessions[sessions.session == 0].user_id.to_numpy())
        # oracle_share is the ratio of the agent's per-state true values to the oracle's, inside its interval
        values = pd.read_parquet(out / "agents" / agent / "oracle_share.parquet")
        assert list(values.columns) == ["policy", "oracle", "oracle_fatigue"] and len(values) == 32
        assert row["eval/oracle_share"] == pytest.approx(values.policy.sum() / values.oracle.sum())
        assert row["eval/oracle_share_ci_low"] <= row["eval/oracle_share"] <= row["eval/oracle_share_ci_high"]
    shares = summary.set_index("agent")["eval/oracle_share"]
    assert shares["oracle"] == 1.0  # the oracle serves the best eligible ad on every state
    assert shares["random"] < shares["cascade-privileged"] < shares["oracle"]
    # the fatigue-aware oracle is the same reference for every agent, a little below the myopic one
    fatigue = summary["eval/oracle_fatigue_share"]
    assert (fatigue == fatigue[0]).all() and 0.5 < fatigue[0] < 1.0
    # same world, same reset seed: every slot's first session has the same user for every agent
    np.testing.assert_array_equal(first_users[0], first_users[1])
    np.testing.assert_array_equal(first_users[0], first_users[2])


def test_library_call_is_the_entry_point(tiny_run, tmp_path, capsys):
    """``compare_agents`` with the config the flags ask for reuses the entry point's cached sessions (the same
    cache key) and writes the same bytes: the entry point adds only its folder record and the printout."""
    out, _ = tiny_run
    cfg = Args(agents="random,cascade-privileged,oracle", out=str(out), **TINY).config()
    assert cfg == EvalConfig(
        agents=("random", "cascade-privileged", "oracle"),
        num_envs=24,
        sessions=48,
        oracle_states=32,
        ci=CIConfig(),
    )
    capsys.readouterr()
    result = compare_agents(cfg, out)
    assert capsys.readouterr().out.count("same config already evaluated") == 3
    files = write_comparison(result, tmp_path, plots=False)
    assert [p.name for p in files] == ["summary.csv", "summary.json", "strata.csv"]
    for name in ("summary.csv", "summary.json", "strata.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_eval_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="agents=.* is empty"):
        EvalConfig(agents=())
    with pytest.raises(ValueError, match="twice"):
        EvalConfig(agents=("random", "random"))
    with pytest.raises(ValueError, match="unknown policy 'bogus'"):
        EvalConfig(agents=("bogus",))
    with pytest.raises(ValueError, match="sessions"):
        EvalConfig(sessions=0)
    with pytest.raises(ValueError, match="oracle_states"):
        EvalConfig(oracle_states=0)
    with pytest.raises(ValueError, match="CIConfig"):
        EvalConfig(ci="bootstrap")


def test_same_seed_same_summary_and_resume(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    main(Args(agents="random,cascade-privileged", out=str(tmp_path), plots=False, **TINY))
    first = json.loads((out / "summary.json").read_text())
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again == {k: first[k] for k in ("random", "cascade-privileged")}
    # the oracle_share states are built once per comparison and shared: an agent valued second on them
    # reads the same values as on states of its own
    alone = main(Args(agents="cascade-privileged", out=str(tmp_path / "alone"), plots=False, **TINY))
    assert alone.iloc[0].to_dict() == {"agent": "cascade-privileged", **first["cascade-privileged"]}
    # a rerun with the same config reuses the sessions; another seed runs again
    table = tmp_path / "agents" / "random" / "sessions.parquet"
    stamp = table.stat().st_mtime_ns
    capsys.readouterr()
    main(Args(agents="random", out=str(tmp_path), plots=False, **TINY))
    assert "random: same config already evaluated" in capsys.readouterr().out
    assert table.stat().st_mtime_ns == stamp
    other = main(Args(agents="random", out=str(tmp_path), plots=False, seed=1, **TINY))
    assert "already evaluated" not in capsys.readouterr().out
    assert other.loc[0, "eval/ctr"] != first["random"]["eval/ctr"]
    # the number of oracle_share states is part of the cache key
    more = main(Args(agents="random", out=str(tmp_path), plots=False, **{**TINY, "oracle_states": 40}))
    assert "already evaluated" not in capsys.readouterr().out
    assert more.loc[0, "eval/oracle_states"] == 40


def _beats_random(summary: pd.DataFrame, key: str) -> bool:
    """oracle and cascade each above random on ``key`` with non-overlapping intervals."""
    r = summary.set_index("agent")
    lo, hi = r[f"eval/{key}_ci_low"], r[f"eval/{key}_ci_high"]
    return bool(lo["oracle"] > hi["random"] and lo["cascade-privileged"] > hi["random"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_and_cascade_beat_random(tmp_path, seed):
    # 1024 sessions, seed 0: revenue/session random 0.233 [0.217, 0.248], cascade 0.943 [0.887, 0.999],
    # oracle 0.953 [0.883, 1.024]. Against the default external competition (mean eCPM 300) the cascade
    # is about as good as the myopic oracle on revenue; only the gap to random is asserted, on three worlds
    # and reset seeds. The tightest case is CTR: the cascade's interval clears random's by 0.025, 0.014 and
    # 0.010 on seeds 0, 1, 2 (at 512 sessions seed 1 fails it, so 1024 it stays).
    summary = main(
        Args(
            agents="random,cascade-privileged,oracle",
            out=str(tmp_path),
            num_envs=256,
            sessions=1024,
            plots=False,
            seed=seed,
            world_seed=seed,
        )
    )
    for key in ("revenue_per_session", "reward_per_session", "ctr", "gmv_per_session"):
        assert _beats_random(summary, key), key


@pytest.mark.slow
def test_demo_size_ranks_the_agents(tmp_path):
    """The README's main job at its default size (512 envs, 2048 sessions): the same ranking."""
    summary = main(Args(out=str(tmp_path), plots=False))
    assert (summary["eval/sessions"] == 2048).all()
    assert _beats_random(summary, "revenue_per_session") and _beats_random(summary, "ctr")


def test_unknown_agent_and_bad_args_raise():
    with pytest.raises(
        ValueError,
        match=r"unknown policy 'bogus': expected one of cascade-privileged, gpr:PATH, learned-cascade:PATH, oracle, oracle-fatigue, random",
    ):
        Args(agents="random,bogus")  # fails before anything runs
    with pytest.raises(ValueError, match="unknown policy 'nope:x'"):
        Args(agents="nope:x")  # no such family
    with pytest.raises(ValueError, match=r"policy 'gpr:runs/x': neither runs/x/policy\.pt nor"):
        Args(agents="gpr:runs/x")  # the family checks its folder before anything runs
    with pytest.raises(ValueError, match="twice"):
        Args(agents="random,random")
    with pytest.raises(ValueError, match="num_envs"):
        Args(num_envs=0)
    with pytest.raises(ValueError, match="ci"):
        Args(ci="t-test")


class FixedAd:
    """Always proposes one ad: a stand-in for a plugged-in agent family (like a future gpr:PATH)."""

    def __init__(self, env, ad: int):
        self.env, self.ad = env, ad

    def act(self, obs):
        n = obs["user_id"].shape[0]
        return PolicyOutput(torch.full((n, 1), self.ad), torch.ones(n, dtype=torch.float64))


def test_agent_family_plugs_in(tmp_path, monkeypatch):
    factory = lambda arg: lambda env, seed: FixedAd(env, int(arg))  # noqa: E731
    monkeypatch.setitem(FAMILIES, "fixed", Family("AD", factory, lambda arg: []))  # reads no files
    with pytest.raises(ValueError, match="fixed:AD"):
        policy_factory("nope")
    summary = main(Args(agents="fixed:7", out=str(tmp_path), num_envs=8, sessions=8, plots=False))
    assert list(summary.agent) == ["fixed:7"]
    sessions = pd.read_parquet(tmp_path / "agents" / "fixed_7" / "sessions.parquet")
    assert len(sessions) == 8 and sessions.invalid.sum() == 0


def test_flags_map_onto_args(capsys):
    args = parse_args(
        ["--agents", "random", "--num-envs", "8", "--world-seed", "3", "--no-plots", "--level", "0.9"]
    )
    assert (args.agents, args.num_envs, args.world_seed, args.plots, args.level) == (
        "random",
        8,
        3,
        False,
        0.9,
    )
    assert args.config().sessions_per_slot == 250 and args.out_dir == Path("runs/eval/ads-v0__small__0")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "same for every agent (same first users)" in " ".join(
        capsys.readouterr().out.split()
    )  # docstrings


def test_command_line_smoke(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "agents.evaluate",
        "--agents",
        "random,cascade-privileged",
        "--num-envs",
        "8",
        "--sessions",
        "8",
        "--out",
        str(tmp_path),
        "--no-plots",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "revenue / session" in res.stdout and "cascade-privileged (reference)" in res.stdout
    assert (tmp_path / "summary.csv").exists()


def test_unlimited_budgets_never_bind_and_keep_the_world(tmp_path, capsys):
    """``budgets="unlimited"``: the same catalog and bids, and no advertiser runs out of budget where the default
    budgets run out; an evaluation under it is a run config of its own (not a cached default run)."""
    with pytest.raises(
        ValueError, match=r"^budgets='none' is unknown: expected one of \['default', 'unlimited'\]"
    ):
        EvalConfig(budgets="none")
    with pytest.raises(ValueError, match=r"^budgets="):
        Args(budgets="none")
    envs = {
        b: make_vec_env("ads-v0", 64, preset="small", validate_actions=False, **BUDGETS[b]) for b in BUDGETS
    }
    default, unlimited = (envs[b].unwrapped.world for b in ("default", "unlimited"))
    torch.testing.assert_close(default.ad_bid, unlimited.ad_bid, rtol=0, atol=0)
    ratio = unlimited.advertiser_budget_share / default.advertiser_budget_share
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1e6 / 1.5))
    ever_out = {}
    for name, env in envs.items():
        obs, _ = env.reset(seed=0)
        policy = make_policy("cascade-privileged@temperature=0", env, 0)
        out = torch.zeros((), dtype=torch.bool)
        for _ in range(300):
            obs, *_ = env.step(policy.act(obs).action)
            out |= ~env.unwrapped.eligible_ads().all()
        ever_out[name] = bool(out)
    assert ever_out == {"default": True, "unlimited": False}

    main(Args(agents="random", out=str(tmp_path), plots=False, **TINY))
    capsys.readouterr()
    main(Args(agents="random", out=str(tmp_path), plots=False, budgets="unlimited", **TINY))
    assert "already evaluated" not in capsys.readouterr().out
