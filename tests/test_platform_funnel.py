"""The learned pCTR/pCVR: labels read from a log, held-out discrimination and calibration with tolerances
derived from the held-out counts, blindness to hidden fields, and the file round trip."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from agents.collection import collect
from agents.policies import make_policy
from envs import make_vec_env
from gpr_sim.data.logs import read_logs, stack_list_column, write_logs
from gpr_sim.metrics import auc, expected_calibration_error, reliability_table
from gpr_sim.platform import FunnelConfig, FunnelModel, catalog_of, fit_funnel, load_funnel, save_funnel
from gpr_sim.platform.funnel import funnel_examples
from gpr_sim.world import WorldConfig, observe
from gpr_sim.world.catalog import generate_world

torch.set_num_threads(1)

NUM_ENVS, STEPS = 256, 500
"""128k requests of the cascade: ~24k impressions (fill ~0.19), ~2.8k clicks, a fifth of the sessions held out"""
CFG = WorldConfig.small()
BINS = 10


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    env = make_vec_env("ads-v0", NUM_ENVS, config=CFG, world_seed=0, device="cpu")
    columns, _ = collect(
        env, make_policy("cascade-privileged", env, seed=0), seed=0, steps=STEPS, progress=False
    )
    path = write_logs(
        columns,
        tmp_path_factory.mktemp("log") / "log.parquet",
        world_config=CFG,
        seed=0,
        policy="cascade-privileged",
    )
    return env, read_logs(path)[0]


@pytest.fixture(scope="module")
def fitted(logged):
    env, df = logged
    world = env.unwrapped.world
    model, report = fit_funnel(df, catalog_of(world), FunnelConfig(), progress=False, world=world)
    return env, df, model, report


def test_labels_are_the_next_observation_events_and_match_the_click_column(logged):
    env, df = logged
    ex = funnel_examples(df, catalog_of(env.unwrapped.world))
    # one slot: one example per impression, its click the row's click
    assert ex.ad.numel() == int(df["impression"].sum()) and bool((ex.slot == 0).all())
    np.testing.assert_array_equal(ex.click.numpy(), df["click"].to_numpy()[ex.row.numpy()])
    np.testing.assert_array_equal(ex.ad.numpy(), stack_list_column(df, "shown_ad")[ex.row.numpy(), 0])
    # conversions reported at once are labelled; none without a click
    reported = df["conversion"].to_numpy()[ex.row.numpy()]
    assert bool((ex.conversion.numpy() >= reported).all()) and bool((ex.conversion <= ex.click).all())
    assert ex.unlabelled == 0  # every row has its next row or final_* columns


def test_delayed_conversions_are_attributed_to_their_click():
    cfg = WorldConfig.small(conversion_delay_mean=3.0)
    env = make_vec_env("ads-v0", 64, config=cfg, world_seed=0, device="cpu")
    columns, _ = collect(
        env, make_policy("cascade-privileged", env, seed=1), seed=1, steps=300, progress=False
    )
    df = pd.DataFrame({k: list(v) if np.ndim(v) == 2 else v for k, v in columns.items() if k[:6] != "final_"})
    ex = funnel_examples(df, catalog_of(env.unwrapped.world))
    # without final_* columns, rows that end a session (or the log) have no next observation
    assert ex.unlabelled > 0
    labelled = int(ex.conversion.sum())
    reported_now = int(df["conversion"].to_numpy()[ex.row.numpy()].sum())
    # a mean delay of 3 requests reports most conversions later, yet they are labelled on their click
    assert labelled > reported_now
    assert labelled <= int(df["conversion"].sum() + df["delayed_conversion"].sum())


def test_two_slots_give_one_example_per_impression_with_its_slot():
    cfg = WorldConfig.small(num_candidates=3, num_slots=2)
    env = make_vec_env("ads-v0", 32, config=cfg, world_seed=0, device="cpu")
    columns, _ = collect(
        env, make_policy("cascade-privileged", env, seed=0), seed=0, steps=60, progress=False
    )
    df = pd.DataFrame({k: list(v) if np.ndim(v) == 2 else v for k, v in columns.items() if k[:6] != "final_"})
    ex = funnel_examples(df, catalog_of(env.unwrapped.world))
    shown = stack_list_column(df, "shown_ad")
    # without final_* columns, the last row of each session in the log has no next observation; every other
    # impression is one example (and per row the slots' clicks add up to the click column: checked inside)
    last = ~df["episode_id"].duplicated(keep="last").to_numpy()
    assert ex.ad.numel() == int((shown[~last] >= 0).sum())
    assert set(ex.slot.tolist()) == {0, 1}
    np.testing.assert_array_equal(ex.ad.numpy(), shown[ex.row.numpy(), ex.slot.numpy()])


def test_learned_funnel_beats_the_constant_and_is_calibrated(fitted):
    _, _, _, report = fitted
    for head in ("ctr", "cvr"):
        learned, constant = report[head]["learned"], report[head]["constant"]
        n1, n = learned["positives"], learned["n"]
        n0 = n - n1
        assert constant["auc"] == 0.5  # every pair a tie
        # AUC's standard error under "no signal" (Hanley & McNeil): sqrt((n0 + n1 + 1) / (12 n0 n1))
        se_auc = math.sqrt((n0 + n1 + 1) / (12 * n0 * n1))
        # a calibrated model's ECE over equal-count bins is ~sqrt(2/pi) se_bin (sd ~0.2 se_bin), se_bin the
        # binomial standard error of one bin's rate, sqrt(p (1 - p) / (n / BINS)) at the base rate p:
        # 2 se_bin leaves room for noise (~5 sd) and a little misfit
        p = n1 / n
        se_bin = math.sqrt(p * (1 - p) / (n / BINS))
        assert learned["ece"] < 2 * se_bin, (head, learned["ece"], 2 * se_bin)
        if head == "ctr":  # conversions are too few (~70 held out) to ask the CVR head for a margin
            assert learned["auc"] > 0.5 + 3 * se_auc, (learned["auc"], se_auc)
            assert learned["log_loss"] < constant["log_loss"]
    assert report["examples"]["val_sessions"] > 0 and set(report["ctr"]) >= {"privileged", "truth"}


def test_report_metrics_are_those_of_the_held_out_rows(fitted):
    env, df, model, report = fitted
    table = report["ctr"]["learned"]["reliability"]
    assert len(table) == BINS and sum(r["count"] for r in table) == report["examples"]["val_impressions"]
    ece = expected_calibration_error(pd.DataFrame(table))
    assert ece == pytest.approx(report["ctr"]["learned"]["ece"])
    truth = report["ctr"]["truth"]
    assert (
        truth["n"] == report["ctr"]["learned"]["n"]
        and truth["positives"] == report["ctr"]["learned"]["positives"]
    )


def test_auc_and_reliability_by_hand():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4: 1/2) (0.4>0.1) -> 3.5 / 4
    assert auc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == 0.875
    assert math.isnan(auc([0.2, 0.3], [1, 1]))
    table = reliability_table([0.1, 0.2, 0.6, 0.9], [0, 1, 1, 1], bins=2)
    # bins {0.1, 0.2}: predicted 0.15, observed 0.5; {0.6, 0.9}: 0.75 vs 1.0 -> ECE (0.35 + 0.25) / 2 = 0.3
    assert table["count"].tolist() == [2, 2]
    assert expected_calibration_error(table) == pytest.approx(0.3)


def _perturbed_hidden(world):
    g = torch.Generator().manual_seed(7)
    noise = lambda t: t + torch.randn(t.shape, generator=g)  # noqa: E731
    return dataclasses.replace(
        world,
        ad_quality=noise(world.ad_quality),
        ad_ctr_bias=noise(world.ad_ctr_bias),
        ad_cvr_bias=noise(world.ad_cvr_bias),
        user_interest=torch.nn.functional.normalize(noise(world.user_interest), dim=-1),
        user_conv_logit=noise(world.user_conv_logit),
        user_tolerance=noise(world.user_tolerance),
    )


def test_model_output_ignores_hidden_world_and_session_fields(fitted):
    env, _, model, _ = fitted
    vec = env.unwrapped
    vec.reset(seed=3)
    world, state = vec.world, vec.state
    ads = torch.randint(0, CFG.num_ads, (NUM_ENVS, 5), generator=torch.Generator().manual_seed(0))
    hidden = _perturbed_hidden(world)
    g = torch.Generator().manual_seed(8)
    moved = state._replace(
        interest=torch.nn.functional.normalize(torch.randn(state.interest.shape, generator=g), dim=-1),
        fatigue=state.fatigue + 5.0 * torch.rand(state.fatigue.shape, generator=g),
    )
    with torch.no_grad():
        base = model(catalog_of(world), observe(world, state), ads)
        other = model(catalog_of(hidden), observe(hidden, moved), ads)
    for a, b in zip(base, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the whole learned score too (its p_stay reads the observable activity tier, never the tolerance)
    vec.attach_platform(model)
    try:
        learned = vec.score(ads, estimator="learned")
        vec.engine.world = hidden
        vec.engine.state = moved
        relearned = vec.score(ads, estimator="learned")
    finally:
        vec.engine.world = world
        vec.engine.state = state
        vec.attach_platform(None)
    for a, b in zip(learned, relearned):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_load_round_trip_and_catalog_mismatch(fitted, tmp_path):
    env, _, model, _ = fitted
    world = env.unwrapped.world
    catalog = catalog_of(world)
    path = save_funnel(model, tmp_path / "funnel.pt")
    loaded = load_funnel(path, "cpu", catalog=catalog)
    assert isinstance(loaded, FunnelModel) and not loaded.training
    obs = env.unwrapped.observe()
    ads = torch.arange(NUM_ENVS * 3).view(NUM_ENVS, 3) % CFG.num_ads
    with torch.no_grad():
        for a, b in zip(model(catalog, obs, ads), loaded(catalog, obs, ads)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    smaller = catalog_of(generate_world(CFG.replace(num_ads=CFG.num_ads - 1), seed=0))
    with pytest.raises(ValueError, match=rf"{path}.*{CFG.num_ads} ads with {CFG.emb_dim}-d embeddings, this"):
        load_funnel(path, "cpu", catalog=smaller)
    other_seed = catalog_of(generate_world(CFG, seed=1))
    with pytest.raises(ValueError, match=rf"{path}.*another catalog \(fingerprint"):
        load_funnel(path, "cpu", catalog=other_seed)
    with pytest.raises(ValueError, match="this catalog has"):
        env.unwrapped.attach_platform(loaded.__class__(FunnelConfig(), smaller))
    with pytest.raises(ValueError, match="not a funnel model|not a readable checkpoint|missing format"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        load_funnel(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "changes",
    [
        {"hidden": 0},
        {"epochs": 0},
        {"val_fraction": 1.0},
        {"val_fraction": 0.0},
        {"lr": 0.0},
        {"layers": 1.5},
    ],
)
def test_config_rejects_bad_values(changes):
    name = next(iter(changes))
    with pytest.raises(ValueError, match=name):
        FunnelConfig(**changes)


def test_fit_is_seeded_and_leaves_the_global_generator_alone(logged):
    env, df = logged
    catalog = catalog_of(env.unwrapped.world)
    cfg = FunnelConfig(hidden=8, layers=1, epochs=1, batch_size=1024)
    state = torch.random.get_rng_state()
    a, report_a = fit_funnel(df, catalog, cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, report_b = fit_funnel(df, catalog, cfg, progress=False)
    assert report_a == report_b
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_fit_stops_on_a_nan_loss(logged, monkeypatch):
    """A funnel whose loss turns NaN stops with one line naming the epoch and the first bad batch (read once
    per epoch), instead of saving NaN weights and a report."""
    from gpr_sim.finite import NonFiniteError

    env, df = logged
    logits = FunnelModel.logits
    calls = []

    def poisoned(self, *args, **kwargs):
        ctr, cvr, rest = logits(self, *args, **kwargs)
        calls.append(1)
        return (ctr * float("nan") if len(calls) == 3 else ctr), cvr, rest  # the third training batch

    monkeypatch.setattr(FunnelModel, "logits", poisoned)
    cfg = FunnelConfig(hidden=8, layers=1, epochs=1, batch_size=256)
    with pytest.raises(NonFiniteError, match=r"^funnel epoch 0, batch 2: non-finite loss$"):
        fit_funnel(df, catalog_of(env.unwrapped.world), cfg, progress=False)
