"""The behaviour chain of pre-training: bootstrap log (privileged cascade) -> fitted platform -> the learned
cascade's log -> MTP on it (``PretrainConfig.behaviour``), and the default left as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import agents.hepo as hepo
from agents import pretrain
from agents.pretraining.config import PretrainConfig
from agents.pretraining.data import behaviour_policy, collect_config, ensure_inputs, load_data
from agents.pretraining.pipeline import ensure_behaviour, ensure_funnel, ensure_pretrained, stage_configs
from agents.rl import config as rl_config
from gpr_sim.data.logs import read_logs
from gpr_sim.platform.funnel import load_funnel
from gpr_sim.runs import write_json
from tests.helpers import TINY_PRETRAIN

TINY = dict(
    collect_envs=16,
    collect_steps=20,
    d_model=16,
    n_layers=1,
    batch_size=32,
    eval_every=3,
    checkpoint_every=3,
    eval_requests=16,
    threads=1,
    progress=False,
)
"""a seconds-long stage (``tests.helpers.TINY_PRETRAIN`` as fields)"""
BOOTSTRAP = (32, 25)
"""sessions x requests of the tiny bootstrap log the platform is fitted on"""


def test_default_behaviour_of_pretraining_is_the_privileged_cascade(tmp_path):
    """``agents.pretrain`` alone logs with the privileged cascade (no platform to fit); the comparison pipeline
    ``agents.hepo`` pre-trains GPR on the learned cascade's logs (the next test)."""
    cfg = PretrainConfig()
    assert cfg.behaviour == "cascade-privileged"
    assert behaviour_policy(cfg, tmp_path / "mtp") == "cascade-privileged"
    assert not (tmp_path / "platform").exists()  # nothing fitted for the default
    assert collect_config(cfg, tmp_path / "l.parquet").policy == "cascade-privileged"
    assert ensure_behaviour(stage_configs(tmp_path, cfg, 3, 3)[0], *BOOTSTRAP) is None


def test_hepo_maps_the_flag_to_both_stages():
    """agents.hepo's default is the learned cascade: MTP imitates a policy that sees only the platform view."""
    assert hepo.Args().behaviour == "learned-cascade"
    mtp, vaft = rl_config.pretraining(hepo.Args(behaviour="cascade-privileged"))
    assert mtp.behaviour == vaft.behaviour == "cascade-privileged"
    assert rl_config.pretraining(hepo.Args())[0] == dataclasses.replace(mtp, behaviour="learned-cascade")


@pytest.mark.parametrize("value", ["learned_cascade", "random", ""])
def test_bad_behaviour_names_the_field(value):
    with pytest.raises(ValueError, match=r"^behaviour=.* is unknown: expected one of"):
        PretrainConfig(behaviour=value)
    with pytest.raises(ValueError, match=r"^behaviour="):
        hepo.Args(behaviour=value)


def test_learned_cascade_chain(tmp_path):
    """ROOT/platform is fitted on ROOT/funnel's bootstrap log, then the MTP log is the learned cascade's (its
    spec in the metadata, exact propensities in (0, 1]) and MTP / VAFT train on it; a second call reuses all."""
    torch.manual_seed(0)
    common = PretrainConfig(behaviour="learned-cascade", **TINY)
    mtp, vaft = stage_configs(tmp_path, common, 3, 3)
    platform = ensure_behaviour(mtp, *BOOTSTRAP)
    assert platform == tmp_path / "platform"
    assert (tmp_path / "platform" / "report.json").is_file()
    boot, boot_meta = read_logs(tmp_path / "funnel" / "logs.parquet")
    assert boot_meta["policy"] == "cascade-privileged" and len(boot) == BOOTSTRAP[0] * BOOTSTRAP[1]

    ensure_pretrained(mtp, vaft)
    df, meta = read_logs(Path(mtp.out) / "logs.parquet")
    assert meta["policy"] == f"learned-cascade:{platform}@temperature=0.3"
    assert meta["temperature"] == pytest.approx(0.3)
    assert len(df) == TINY["collect_envs"] * TINY["collect_steps"]
    prop = df["propensity"].to_numpy(float)  # of each request's whole ordered candidate list
    assert np.all((prop > 0) & (prop <= 1)) and np.any(prop < 1)  # exploring (temperature > 0), exact
    data = load_data(vaft, *ensure_inputs(vaft, Path(vaft.out)))  # VAFT targets read the learned log
    assert len(data.train) + len(data.held_out) == len(df)
    assert torch.isfinite(data.train.weights).all()

    stamp = {p: p.stat().st_mtime_ns for p in (platform / "retrieval.pt", Path(mtp.out) / "logs.parquet")}
    ensure_behaviour(mtp, *BOOTSTRAP)
    ensure_pretrained(mtp, vaft)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # reused, not refitted or recollected


def test_the_reward_funnel_is_the_platforms_when_it_is_fitted(tmp_path):
    """With a fitted platform the RL reward's funnel is its ``funnel.pt`` (no second fit of the same model);
    without one, ``ROOT/funnel/model.pt`` is fitted on the same bootstrap log and equals it."""
    common = PretrainConfig(behaviour="learned-cascade", **TINY)
    mtp = stage_configs(tmp_path / "a", common, 3, 3)[0]
    platform = ensure_behaviour(mtp, *BOOTSTRAP)
    assert ensure_funnel(mtp, *BOOTSTRAP) == platform / "funnel.pt"
    assert not (tmp_path / "a" / "funnel" / "model.pt").exists()

    alone = stage_configs(tmp_path / "b", dataclasses.replace(common, behaviour="cascade-privileged"), 3, 3)[
        0
    ]
    (tmp_path / "b" / "funnel").mkdir(parents=True)
    (tmp_path / "b" / "funnel" / "logs.parquet").write_bytes(
        (tmp_path / "a" / "funnel" / "logs.parquet").read_bytes()
    )
    fitted = ensure_funnel(alone, *BOOTSTRAP)
    assert fitted == tmp_path / "b" / "funnel" / "model.pt"
    ours, theirs = (load_funnel(p).state_dict() for p in (fitted, platform / "funnel.pt"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_a_finished_stage_of_another_behaviour_is_refused(tmp_path):
    """The pipeline reuses a finished stage as it is, so one asked for with another behaviour fails, naming it."""
    mtp, vaft = stage_configs(tmp_path, PretrainConfig(**TINY), 3, 3)
    for stage in (mtp, vaft):
        Path(stage.out).mkdir()
        write_json(Path(stage.out) / "summary.json", {"steps": 3})
        write_json(Path(stage.out) / "config.json", {})  # written before the field: the privileged cascade's
    ensure_pretrained(mtp, vaft)  # the default reuses it
    chain = (dataclasses.replace(s, behaviour="learned-cascade") for s in (mtp, vaft))
    with pytest.raises(ValueError, match=r"^behaviour='learned-cascade' does not match .*mtp"):
        ensure_pretrained(*chain)


def test_pretrain_cli_fits_the_platform_beside_its_folder(tmp_path):
    """``agents.pretrain --behaviour learned-cascade`` alone: the platform and its bootstrap log (the stage's
    collect size) are siblings of OUT, the pipeline's layout."""
    out = tmp_path / "mtp"
    pretrain.main(["--out", str(out), "--behaviour", "learned-cascade", *TINY_PRETRAIN])
    _, boot_meta = read_logs(tmp_path / "funnel" / "logs.parquet")
    _, meta = read_logs(out / "logs.parquet")
    assert boot_meta["policy"] == "cascade-privileged" and boot_meta["num_envs"] == 16
    assert meta["policy"] == f"learned-cascade:{tmp_path / 'platform'}@temperature=0.3"
