"""The learned cascade: its stages learn what they are trained on, its propensities are exact, it reads only the
platform view, and its folder loads or fails with one line."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from agents.policies.cascade import plackett_luce_sample
from gpr_sim.platform import catalog_of, estimate_interest
from gpr_sim.platform.preranking import (
    NUM_FEATURES,
    PrerankingConfig,
    centred_mse,
    fit_preranking,
    preranking_from_payload,
    preranking_payload,
)
from gpr_sim.platform.retrieval import (
    RetrievalConfig,
    fit_retrieval,
    recall_at,
    retrieval_from_payload,
    retrieval_payload,
    sampled_softmax_loss,
)
from gpr_sim.world import WorldConfig, generate_world, initial, observe

SMALL = WorldConfig(num_ads=60, num_organic=200, num_users=300, num_advertisers=10)


def _requests(world, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n first requests of sessions of ``world`` (observations only)."""
    zeros = torch.zeros(n, dtype=torch.int64)
    state = initial(world, torch.full((n,), seed, dtype=torch.int64), torch.arange(n), zeros, zeros)
    return observe(world, state)


def _best_by_interest(catalog, req) -> torch.Tensor:
    """A click rule a two-tower model can learn: the ad whose content best matches the estimated interest."""
    interest = estimate_interest(catalog, req["organic"], req["ad_history"], req["ad_events"])
    return (interest @ catalog.ad_emb.T).argmax(1)


# ----------------------------------------------------------------------------- retrieval


def test_full_softmax_is_cross_entropy_over_the_catalog():
    world = generate_world(SMALL, seed=0)
    catalog = catalog_of(world)
    req = _requests(world, 8)
    model, _ = fit_retrieval(catalog, req, _best_by_interest(catalog, req), RetrievalConfig(epochs=1))
    from gpr_sim.platform.retrieval import request_features

    x = request_features(catalog, req)
    clicked = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    full = sampled_softmax_loss(model, catalog, x, clicked, catalog.num_ads, g)
    logits = model.encode_requests(x) @ model.encode_ads(catalog).T
    torch.testing.assert_close(full, F.cross_entropy(logits, clicked))


def test_retrieval_learns_a_content_click_rule_and_chunks_do_not_matter():
    world = generate_world(SMALL, seed=0)
    catalog = catalog_of(world)
    train, test = _requests(world, 600, seed=1), _requests(world, 200, seed=2)
    cfg = RetrievalConfig(epochs=15, num_negatives=16, chunk_size=7)
    model, report = fit_retrieval(catalog, train, _best_by_interest(catalog, train), cfg)
    assert report["loss_last"] < report["loss_first"]
    # Chance recall@10 of 60 ads is 1/6; a model that learned the rule finds most held-out clicks.
    assert recall_at(model, catalog, test, _best_by_interest(catalog, test), 10) > 0.6
    # Row chunks give the same top-R as one chunk; a saved and loaded model retrieves the same ads.
    ads, scores = model.retrieve(catalog, test, 10)
    big = retrieval_from_payload(retrieval_payload(model))
    big.config = dataclasses.replace(big.config, chunk_size=4096)
    ads2, scores2 = big.retrieve(catalog, test, 10)
    torch.testing.assert_close(scores, scores2)
    assert torch.equal(ads, ads2)


def test_retrieval_keeps_only_eligible_ads_while_enough_are_eligible():
    world = generate_world(SMALL, seed=0)
    catalog = catalog_of(world)
    req = _requests(world, 20)
    model, _ = fit_retrieval(catalog, req, _best_by_interest(catalog, req), RetrievalConfig(epochs=1))
    eligible = torch.arange(catalog.num_ads) % 3 == 0  # 20 eligible ads
    ads, scores = model.retrieve(catalog, req, 15, eligible)
    assert bool(eligible[ads].all()) and bool(torch.isfinite(scores).all())
    ads, scores = model.retrieve(catalog, req, 25, eligible)  # more than are eligible: they come last
    assert bool(eligible[ads[:, :20]].all()) and not bool(eligible[ads[:, 20:]].any())


def test_retrieval_rejects_bad_input():
    world = generate_world(SMALL, seed=0)
    catalog = catalog_of(world)
    req = _requests(world, 4)
    with pytest.raises(ValueError, match="no clicked requests"):
        fit_retrieval(
            catalog, {k: v[:0] for k, v in req.items()}, torch.zeros(0, dtype=torch.int64), RetrievalConfig()
        )
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        fit_retrieval(catalog, req, torch.tensor([0, 1, 2, 60]), RetrievalConfig())
    with pytest.raises(ValueError, match="dim=0"):
        RetrievalConfig(dim=0)
    with pytest.raises(ValueError, match="lr="):
        RetrievalConfig(lr=float("nan"))


# ----------------------------------------------------------------------------- pre-ranking


def test_centred_mse_ignores_a_per_request_shift():
    pred = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0]])
    target = pred + torch.tensor([[10.0], [-5.0]])
    assert float(centred_mse(pred, target)) < 1e-12
    # [[0, 0, 0], [1, 0, -1]] off after centring: mean square (1 + 1) / 6
    assert math.isclose(
        float(centred_mse(pred, target + torch.tensor([[0, 0, 0], [1, 0, -1]]))), 2 / 6, rel_tol=1e-6
    )


def test_preranking_distils_a_teacher_and_keeps_its_top():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(400, 30, NUM_FEATURES, generator=g)
    teacher = features @ torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0]) + torch.randn(400, 1, generator=g)
    model, report = fit_preranking(features, teacher, PrerankingConfig(epochs=30, batch_size=64))
    assert report["loss_last"] < 0.05 * report["loss_first"]  # a linear teacher is within the MLP's reach
    ads = torch.arange(30).expand(400, 30)
    kept = model.keep(ads, features, 5)
    top = teacher.argmax(1, keepdim=True)
    assert float((kept == top).any(1).float().mean()) > 0.95  # the teacher's best survives pre-ranking
    loaded = preranking_from_payload(preranking_payload(model))
    torch.testing.assert_close(loaded(features), model(features).detach())
    eligible = torch.arange(30) >= 10
    assert bool(eligible[model.keep(ads, features, 5, eligible)].all())


def test_preranking_rejects_bad_input():
    with pytest.raises(ValueError, match="must be"):
        fit_preranking(torch.zeros(4, 3, NUM_FEATURES), torch.zeros(4, 2), PrerankingConfig())
    with pytest.raises(ValueError, match="non-finite"):
        fit_preranking(torch.zeros(2, 3, NUM_FEATURES), torch.full((2, 3), float("nan")), PrerankingConfig())
    with pytest.raises(ValueError, match="hidden=0"):
        PrerankingConfig(hidden=0)


# ----------------------------------------------------------------------------- exploration


def test_plackett_luce_propensity_by_hand_on_three_items():
    # Weights 1, 2, 3 (logits log w): P(first 2, then 1) = 3/6 * 2/3 = 1/3; P(0 then 2) = 1/6 * 3/5 = 1/10.
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    logits = torch.log(w).expand(4000, 3)
    order, prop = plackett_luce_sample(logits, 2, torch.Generator().manual_seed(0))

    def by_hand(i: int, j: int) -> float:
        return float(w[i] / w.sum() * w[j] / (w.sum() - w[i]))

    expected = torch.tensor([by_hand(int(i), int(j)) for i, j in order], dtype=torch.float64)
    torch.testing.assert_close(prop, expected)
    assert math.isclose(sum(by_hand(i, j) for i in range(3) for j in range(3) if i != j), 1.0)
    # Sampled frequencies match: (2, 1) has probability 1/3, binomial sd sqrt(1/3 * 2/3 / 4000) ~ 0.0075.
    freq = float(((order[:, 0] == 2) & (order[:, 1] == 1)).double().mean())
    assert abs(freq - 1 / 3) < 4 * 0.0075


# ----------------------------------------------------------------------------- the policy on a fitted folder
# These need the learned funnel (gpr_sim.platform.funnel) and the env's learned scoring API.

LOG_WORLD = WorldConfig.small(num_ads=80, num_organic=300, num_users=400, num_advertisers=12)


@pytest.fixture(scope="module")
def platform_dir(tmp_path_factory):
    """A platform folder fitted (tiny settings) on a short cascade log of ``LOG_WORLD``."""
    pytest.importorskip("gpr_sim.platform.funnel")
    from agents.collection import CollectConfig, write_log
    from agents.fit_platform import main

    tmp = tmp_path_factory.mktemp("platform")
    log = write_log(
        CollectConfig(num_envs=64, steps=40, out=str(tmp / "log.parquet"), progress=False), LOG_WORLD
    )
    flags = "--retrieval.epochs 3 --preranking.epochs 3 --preranking-requests 500 --states 64 --no-progress"
    return main(["--logs", str(log), "--out", str(tmp / "platform"), "--device", "cpu", *flags.split()])


def _env(num_envs: int = 16):
    from envs import ENV_ID, make_vec_env

    return make_vec_env(ENV_ID, num_envs, config=LOG_WORLD, world_seed=0, validate_actions=False)


def test_fit_writes_a_folder_the_registry_loads(platform_dir):
    from agents.policies import known_policies, make_policy, policy_inputs, policy_options
    from gpr_sim.runs import read_json

    assert "learned-cascade:PATH" in known_policies()
    assert policy_options(f"learned-cascade:{platform_dir}") == ["temperature"]
    assert [p.name for p in policy_inputs(f"learned-cascade:{platform_dir}")] == [
        "funnel.pt",
        "retrieval.pt",
        "preranking.pt",
    ]
    report = read_json(platform_dir / "report.json")
    s = report["stage_losses"]
    for key in ("retrieval_recall_best", "preranking_keep_best", "ranking_top1_best"):
        assert 0.0 <= s[key] <= 1.0
    # Each stage keeps a subset of the last (the greedy pick is one ad of the pre-ranked set), so value can only fall.
    assert (
        1.0 + 1e-9
        >= s["value_share_retrieved"]
        >= s["value_share_preranked"]
        >= s["value_share_greedy"]
        >= 0.0
    )
    lost = ("lost_retrieval", "lost_preranking", "lost_ranking", "lost_exploration")
    assert math.isclose(sum(s[k] for k in lost), 1.0 - s["value_share_served"], abs_tol=1e-9)
    assert (platform_dir / "report.md").read_text().startswith("# Platform fit")
    phases = ("world", "funnel", "requests", "retrieval", "preranking", "stage_losses")
    assert list(report["seconds"]) == list(phases) and all(report["seconds"][k] >= 0 for k in phases)
    assert "## seconds" in (platform_dir / "report.md").read_text()
    env = _env()
    obs, _ = env.reset(seed=3)
    out = make_policy(f"learned-cascade:{platform_dir}", env, seed=0).act(obs)
    assert out.action.shape == (16, LOG_WORLD.num_candidates)


def test_acts_with_eligible_candidates_and_exact_propensities(platform_dir):
    from agents.policies import make_policy

    env = _env()
    obs, _ = env.reset(seed=5)
    policy = make_policy(f"learned-cascade:{platform_dir}", env, seed=1, temperature=0.5)
    pool, logits = policy.pool(obs)
    out = policy.act(obs)
    eligible = env.unwrapped.eligible_ads()
    assert bool(((out.action >= 0) & (out.action < LOG_WORLD.num_ads)).all()) and bool(
        eligible[out.action].all()
    )
    assert bool((pool == out.action[:, :1]).any(1).all())  # candidates come from the ranked pool
    # K = 1: the propensity is the chosen ad's share of softmax(logits / T) over the pool.
    share = torch.softmax((logits / 0.5).double(), dim=1)
    expected = (share * (pool == out.action[:, :1])).sum(1)
    torch.testing.assert_close(out.propensity, expected)
    greedy = make_policy(f"learned-cascade:{platform_dir}", env, seed=1, temperature=0.0).act(obs)
    assert bool((greedy.propensity == 1.0).all())
    assert torch.equal(greedy.action[:, 0], pool.gather(1, logits.argmax(1, keepdim=True))[:, 0])


def test_hidden_world_and_session_fields_do_not_move_its_actions(platform_dir):
    """Two envs in the same observable state, one with every hidden field redrawn: the same actions."""
    from agents.policies import make_policy

    a, b = _env(), _env()
    a.reset(seed=7)
    g = torch.Generator().manual_seed(0)
    world = b.unwrapped.engine.world
    num_ads, num_users = LOG_WORLD.num_ads, LOG_WORLD.num_users
    b.unwrapped.engine.world = dataclasses.replace(
        world,
        ad_quality=torch.randn(num_ads, generator=g),
        ad_ctr_bias=torch.randn(num_ads, generator=g),
        ad_cvr_bias=torch.randn(num_ads, generator=g),
        user_interest=F.normalize(torch.randn(num_users, LOG_WORLD.emb_dim, generator=g), dim=1),
        user_conv_logit=torch.randn(num_users, generator=g),
        user_tolerance=torch.randn(num_users, generator=g),
    )
    b.unwrapped.load_state_dict(a.unwrapped.state_dict())
    state = b.unwrapped.engine.state
    b.unwrapped.engine.state = state._replace(
        interest=F.normalize(torch.randn(state.interest.shape, generator=g), dim=1),
        fatigue=torch.rand(state.fatigue.shape, generator=g) * 3.0,
    )
    obs_a, obs_b = a.unwrapped.observe(), b.unwrapped.observe()
    for key in obs_a:
        assert torch.equal(obs_a[key], obs_b[key]), key
    every = torch.arange(num_ads).expand(16, num_ads)
    assert not torch.equal(
        a.unwrapped.score(every, truth=True).value, b.unwrapped.score(every, truth=True).value
    )
    for t in (0.0, 0.3):
        out_a = make_policy(f"learned-cascade:{platform_dir}", a, seed=2, temperature=t).act(obs_a)
        out_b = make_policy(f"learned-cascade:{platform_dir}", b, seed=2, temperature=t).act(obs_b)
        assert torch.equal(out_a.action, out_b.action)
        torch.testing.assert_close(out_a.propensity, out_b.propensity)


def test_a_bad_folder_fails_with_one_line(tmp_path, platform_dir):
    import shutil

    from agents.platform.folder import load_platform
    from agents.policies import make_policy, policy_factory

    with pytest.raises(ValueError, match="not a platform folder"):
        policy_factory(f"learned-cascade:{tmp_path / 'nothing'}")
    bad = tmp_path / "bad"
    shutil.copytree(platform_dir, bad)
    (bad / "preranking.pt").unlink()
    with pytest.raises(ValueError, match="lacks preranking.pt"):
        policy_factory(f"learned-cascade:{bad}")
    (bad / "preranking.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="preranking.pt") as err:
        make_policy(f"learned-cascade:{bad}", _env(2))
    assert "\n" not in str(err.value)
    shutil.copy(platform_dir / "retrieval.pt", bad / "preranking.pt")  # a checkpoint of another stage
    with pytest.raises(ValueError, match="not a pre-ranking model"):
        load_platform(bad)


def test_oracle_share_is_exact_and_agrees_with_the_stage_losses(platform_dir):
    from agents.evaluation.oracle_share import OracleShareConfig, RequestStates, oracle_share
    from agents.platform.folder import load_platform
    from agents.platform.stage_losses import stage_losses
    from agents.policies import make_policy
    from agents.policies.distribution import action_distribution, prob_of
    from agents.policies.learned_cascade import LearnedCascadeConfig

    config = OracleShareConfig(states=32, seed=11)
    states = RequestStates.from_env(_env(32), config)
    policy = make_policy(f"learned-cascade:{platform_dir}", states.env, seed=4, temperature=0.3)
    out = policy.act(states.obs)
    torch.testing.assert_close(
        prob_of(action_distribution(policy, states.obs), out.action[:, 0]), out.propensity
    )
    share = oracle_share(policy, states)["oracle_share"]
    losses = stage_losses(
        load_platform(platform_dir), LOG_WORLD, 0, config, LearnedCascadeConfig(temperature=0.3)
    )
    assert math.isclose(share, losses["value_share_served"], rel_tol=1e-9)


def test_fit_refuses_a_log_of_another_world_than_named(platform_dir, tmp_path):
    from agents.fit_platform import main

    log = str(platform_dir.parent / "log.parquet")
    with pytest.raises(ValueError, match="world_seed=3 does not match"):
        main(["--logs", log, "--out", str(tmp_path / "p"), "--world-seed", "3", "--device", "cpu"])
    with pytest.raises(ValueError, match="preset='small' does not match"):
        main(["--logs", log, "--out", str(tmp_path / "p"), "--preset", "small", "--device", "cpu"])
    assert not (tmp_path / "p").exists()  # refused before the folder is claimed


def test_collects_a_log_with_its_own_temperature_and_propensities(platform_dir, tmp_path):
    from agents.collection import CollectConfig, write_log
    from gpr_sim.data.logs import read_logs

    spec = f"learned-cascade:{platform_dir}"
    cfg = CollectConfig(policy=spec, temperature=0.5, num_envs=16, steps=3, out=str(tmp_path / "l.parquet"))
    df, meta = read_logs(write_log(dataclasses.replace(cfg, progress=False), LOG_WORLD))
    assert meta["policy"] == spec and meta["temperature"] == 0.5
    assert len(df) == 48 and (df["propensity"] > 0).all() and (df["propensity"] < 1).any()
    with pytest.raises(ValueError, match="only used by the exploring cascades"):
        CollectConfig(policy="oracle", temperature=0.5)
