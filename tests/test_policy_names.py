"""The privileged cascade's name: ``cascade-privileged``, with ``cascade`` a deprecated alias that old logs
and ``agents.evaluate`` folders still resolve; privileged policies are labelled references in tables."""

import json
import warnings

import pandas as pd
import pytest
import torch

from agents import ope
from agents.collection import CollectConfig, write_log
from agents.policies import (
    ALIASES,
    POLICIES,
    canonical_policy,
    is_privileged,
    known_policies,
    make_policy,
    policy_factory,
    policy_label,
    policy_options,
    split_spec,
)
from agents.policies.cascade import CascadePolicy
from agents.reporting.folders import read_baseline, read_baseline_strata
from agents.reporting.keys import BASELINE
from envs import make_vec_env
from gpr_sim.data.logs import read_logs, write_logs
from gpr_sim.world import WorldConfig

torch.set_num_threads(1)
CFG = WorldConfig.small(num_ads=60, num_advertisers=12, num_organic=200, num_users=100)


def test_the_former_name_resolves_to_the_same_policy_with_one_warning():
    assert ALIASES == {"cascade": "cascade-privileged"} and BASELINE == "cascade-privileged"
    assert "cascade" not in known_policies() and "cascade" not in POLICIES  # new code sees one name
    with pytest.warns(FutureWarning, match="policy 'cascade' is deprecated: use 'cascade-privileged'"):
        assert policy_factory("cascade") is POLICIES["cascade-privileged"]
    with pytest.warns(FutureWarning):
        assert policy_options("cascade") == policy_options("cascade-privileged") == ["temperature"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current name and the silent resolution never warn
        assert canonical_policy("cascade") == "cascade-privileged" == canonical_policy("cascade-privileged")
        assert canonical_policy("gpr:runs/x") == "gpr:runs/x"
        policy_factory("cascade-privileged")


def test_the_alias_builds_the_same_seeded_policy():
    env = make_vec_env("ads-v0", 6, config=CFG, world_seed=0)
    obs, _ = env.reset(seed=1)
    new = make_policy("cascade-privileged", env, seed=3, temperature=0.5)
    with pytest.warns(FutureWarning):
        old = make_policy("cascade", env, seed=3, temperature=0.5)
    assert type(old) is type(new) is CascadePolicy and old.config == new.config
    a, b = new.act(obs), old.act(obs)  # same seed, same state: the same draws
    assert torch.equal(a.action, b.action) and torch.equal(a.propensity, b.propensity)


def test_privileged_policies_are_labelled_references():
    for name in ("cascade-privileged", "cascade", "oracle", "oracle-fatigue"):
        assert is_privileged(name) and policy_label(name) == f"{name} (reference)"
    for name in ("random", "learned-cascade:runs/platform/p", "gpr:runs/hepo/r"):
        assert not is_privileged(name) and policy_label(name) == name


def test_a_collected_log_records_the_current_name(tmp_path):
    with pytest.warns(FutureWarning):
        cfg = CollectConfig(
            policy="cascade", num_envs=4, steps=3, out=str(tmp_path / "l.parquet"), progress=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config warned once; collecting resolves the name silently
        path = write_log(cfg, CFG)
    assert read_logs(path)[1]["policy"] == "cascade-privileged"


def test_ope_resimulates_a_log_that_names_the_former_policy_exactly_as_before(tmp_path):
    # the same log written twice, its metadata naming the behaviour policy by the current and the former name
    cfg = CollectConfig(
        num_envs=8, steps=12, temperature=0.3, out=str(tmp_path / "new.parquet"), progress=False
    )
    new = write_log(cfg, CFG)
    df, meta = read_logs(new)
    extra = {k: v for k, v in meta.items() if k not in ("world_config", "seed", "policy")}
    old = write_logs(
        df,
        tmp_path / "old.parquet",
        world_config=meta["world_config"],
        seed=meta["seed"],
        policy="cascade",
        extra=extra,
    )
    assert read_logs(old)[1]["policy"] == "cascade"
    tables = []
    for path in (new, old):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an old log is legitimate: no deprecation warning
            res = ope.main(
                [
                    "--logs",
                    str(path),
                    "--policy",
                    "random",
                    "--out",
                    str(tmp_path / path.stem),
                    "--no-progress",
                ]
            )
        tables.append(res["estimates"])
    # the re-simulation reproduced both logs (it raises otherwise) and every estimate is the same number
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


def _evaluate_folder(folder, agents):
    """A minimal ``agents.evaluate`` folder: a summary row per agent (CTR = its index), a strata row each."""
    folder.mkdir()
    (folder / "summary.json").write_text(
        json.dumps({a: {"eval/ctr": float(i)} for i, a in enumerate(agents)})
    )
    (folder / "config.json").write_text("{}")
    strata = [
        {"agent": a, "stratum": "activity_tier", "group": "1", "eval/ctr": float(i)}
        for i, a in enumerate(agents)
    ]
    pd.DataFrame(strata).to_csv(folder / "strata.csv", index=False)
    return folder


def test_reports_read_the_baseline_under_either_name(tmp_path):
    old = _evaluate_folder(tmp_path / "old", ["random", "cascade"])  # written before the rename
    assert read_baseline(old)[0] == {"eval/ctr": 1.0}
    assert read_baseline_strata(old)[("activity_tier", "1")]["eval/ctr"] == 1.0
    both = _evaluate_folder(tmp_path / "both", ["cascade", "cascade-privileged"])  # the current name first
    assert read_baseline(both)[0] == {"eval/ctr": 1.0}
    assert read_baseline_strata(both)[("activity_tier", "1")]["eval/ctr"] == 1.0
    with pytest.raises(ValueError, match=r"no 'cascade-privileged' row \(agents: random, oracle\)"):
        read_baseline(_evaluate_folder(tmp_path / "none", ["random", "oracle"]))
    with pytest.raises(ValueError, match=r"no 'cascade-privileged' rows \(agents: random, oracle\)"):
        read_baseline_strata(tmp_path / "none")


# -- options written into a spec (``NAME[:ARG]@key=value``): one policy twice in one agent list ----------------


def test_split_spec_parses_typed_options_and_rejects_malformed_ones():
    assert split_spec("random") == ("random", {})
    assert split_spec("gpr:runs/x@beam_width=4@rank=value@flag=true@t=0.5") == (
        "gpr:runs/x",
        {"beam_width": 4, "rank": "value", "flag": True, "t": 0.5},
    )
    for bad in ("cascade-privileged@temperature", "cascade-privileged@=1", "cascade-privileged@t=1@t=2"):
        with pytest.raises(ValueError, match="cascade-privileged"):
            split_spec(bad)


def test_spec_options_build_the_same_policy_as_keyword_options():
    env = make_vec_env("ads-v0", 8, config=CFG)
    obs, _ = env.reset(seed=1)
    a = make_policy("cascade-privileged@temperature=0", env, seed=3).act(obs)
    b = make_policy("cascade-privileged", env, seed=3, temperature=0.0).act(obs)
    c = make_policy("cascade-privileged", env, seed=3).act(obs)  # the default exploring cascade
    assert torch.equal(a.action, b.action) and torch.equal(a.propensity, b.propensity)
    assert not torch.equal(a.propensity, c.propensity)
    assert is_privileged("cascade-privileged@temperature=0")
    assert policy_label("cascade-privileged@temperature=0") == "cascade-privileged@temperature=0 (reference)"
    with pytest.raises(ValueError, match=r"takes no option \['beam'\]"):
        policy_factory("cascade-privileged@beam=3")
    with pytest.raises(ValueError, match="already sets"):
        make_policy("cascade-privileged@temperature=0", env, seed=3, temperature=0.5)
