"""The trie bandit of ``benchmarks/credit_trie.py``: its policy's terms, its reward, and the learners on it."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import pytest
import torch

from benchmarks.credit_trie import (
    LEARNERS,
    POLICIES,
    POLICY_CLASSES,
    SharedPolicy,
    TablePolicy,
    TrieBandit,
    TrieProblem,
    collect,
    learner_setup,
    main,
    run,
    schedule_of,
    sweep,
)


@pytest.mark.parametrize("kind", POLICIES)
def test_the_policy_terms_are_its_sampling_distribution(kind):
    """The log-probs the update recomputes are those the paths were drawn with: per path, the levels' log-probs sum
    to the log of its leaf's probability, and the leaves' probabilities sum to 1 per context."""
    p = TrieProblem(depth=3, branching=3, contexts=5, policy=kind)
    policy = POLICY_CLASSES[kind](p)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for param in policy.parameters():  # away from the uniform start (the shared heads start at zero)
            param.normal_(generator=g)
    probs = policy.leaf_probs()
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64))
    ctx = torch.arange(5).repeat(40)
    codes = policy.sample(ctx, 6, torch.Generator().manual_seed(1))
    log_prob, values = policy.terms(ctx, codes)
    assert log_prob.shape == (200, 6, 3) and values.shape == (200, 6, 4)
    leaf = policy.nodes(codes)[..., -1] - policy.offsets[p.depth]
    torch.testing.assert_close(
        log_prob.sum(-1).double(), probs[ctx[:, None], leaf].log(), rtol=1e-5, atol=1e-5
    )
    # drawn as often as their probability: one context's empirical leaf frequencies over many draws
    many = policy.sample(torch.zeros(20_000, dtype=torch.int64), 1, torch.Generator().manual_seed(2))
    counts = torch.bincount(policy.nodes(many)[:, 0, -1] - policy.offsets[p.depth], minlength=27).double()
    assert (counts / 20_000 - probs[0]).abs().max() < 0.02  # ~4 standard errors at p = 0.1


def test_the_bandit_reward_has_unit_spread_and_its_credit_where_asked():
    """Each context's expected reward has mean 0 and sd 1 over the leaves, and the first code explains the share
    of it that ``credit`` asks for: most with ``early``, little with ``late``."""
    share = {}
    for credit in ("early", "flat", "late"):
        r = TrieBandit(
            TrieProblem(depth=4, branching=4, contexts=64, credit=credit), seed=3
        ).reward  # (C, 256)
        torch.testing.assert_close(r.mean(1), torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(r.std(1), torch.ones(64, dtype=torch.float64))
        first = r.view(64, 4, 64).mean(-1, keepdim=True).expand(64, 4, 64).reshape(64, 256)  # E[R | code 1]
        share[credit] = float((first.var(1) / r.var(1)).mean())
    # level l's variance s_l^2 x (1 - 4^-l) (the finite tree): the first code's share is about 0.71 early, 0.20
    # flat, 0.009 late (the mean over contexts of a ratio of 3-degree-of-freedom spreads: a loose band)
    assert share["early"] > 0.5 and 0.1 < share["flat"] < 0.35 and share["late"] < 0.05


def test_the_codebook_reward_is_one_term_per_level_and_code():
    """``codebook``: a code's term is the same under every parent, so the reward is additive over the levels (no
    interaction left once each level's main effect is removed); ``tree`` (a term per node) is not."""
    residual = {}
    for reward in ("codebook", "tree"):
        r = TrieBandit(TrieProblem(depth=2, branching=8, contexts=16, reward=reward), seed=1).reward.view(
            16, 8, 8
        )
        additive = r.mean(2, keepdim=True) + r.mean(1, keepdim=True) - r.mean((1, 2), keepdim=True)
        residual[reward] = float((r - additive).pow(2).mean())
    assert (
        residual["codebook"] < 1e-20 and residual["tree"] > 0.01
    )  # the tree's level-2 terms: ~1/3 of R's spread


def test_the_shared_policy_shares_a_code_across_parents():
    """One gradient step on a path's last code moves that code's probability under the other parents too (its
    embedding and the trunk are shared), where the table leaves every other prefix where it was."""
    moved = {}
    for kind, cls in (("table", TablePolicy), ("shared", SharedPolicy)):
        torch.manual_seed(0)
        p = TrieProblem(depth=2, branching=4, contexts=1, policy=kind)
        policy = cls(p)
        before = policy.leaf_probs().view(4, 4) / policy.leaf_probs().view(4, 4).sum(1, keepdim=True)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        log_prob, _ = policy.terms(torch.zeros(1, dtype=torch.int64), torch.tensor([[[0, 3]]]))
        (-log_prob[..., 1].sum()).backward()  # raise code 3 under parent 0
        opt.step()
        after = policy.leaf_probs().view(4, 4) / policy.leaf_probs().view(4, 4).sum(1, keepdim=True)
        assert after[0, 3] > before[0, 3]
        moved[kind] = float((after[1:, 3] - before[1:, 3]).min())  # code 3 under parents 1-3
    assert moved["table"] == 0.0 and moved["shared"] > 0.0


def test_the_shared_critic_trains_itself_only():
    """``shared``: the critic's loss reaches the critic's own weights only (the context read detached, as the HTE's);
    ``shared_trunk``: it pulls on the policy's trunk as well."""
    for kind, touches_policy in (("shared", False), ("shared_trunk", True)):
        torch.manual_seed(0)
        policy = POLICY_CLASSES[kind](TrieProblem(depth=2, branching=4, contexts=3, policy=kind))
        torch.nn.init.normal_(policy.value.weight)  # (a zero head passes no gradient below it)
        _, values = policy.terms(torch.arange(3), torch.randint(4, (3, 5, 2)))
        values.pow(2).sum().backward()
        grads = [policy.context.weight.grad, policy.trunk[0].weight.grad, policy.code.weight.grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == touches_policy
        assert policy.value.weight.grad.abs().sum() > 0


def test_a_network_run_is_its_seed_s_whatever_ran_before():
    """The network's initial weights come from the run's seed, not from the process's random state: a sweep's
    workers run their jobs in any order, and the learners' differences are paired on the same start."""
    p = TrieProblem(depth=2, branching=4, contexts=4, requests=8, iterations=3, policy="shared", lr=0.01)
    first = run(p, "hepo", seed=5)
    torch.manual_seed(123)
    torch.randn(1000)
    assert run(p, "hepo", seed=5) == first


def test_the_observed_reward_adds_the_stated_noise():
    p = TrieProblem(depth=2, branching=4, contexts=2, noise=2.0)
    bandit = TrieBandit(p, seed=0)
    ctx, leaf = torch.zeros(50_000, dtype=torch.int64), torch.zeros(50_000, 1, dtype=torch.int64)
    obs = bandit.observe(ctx, leaf, torch.Generator().manual_seed(0))
    assert (
        abs(float(obs.mean()) - float(bandit.reward[0, 0])) < 0.03
    )  # 1.5 standard errors of 2 / sqrt(5e4)... x4
    assert abs(float(obs.std()) - 2.0) < 0.03


@pytest.mark.parametrize(
    "learner, kind, lr",
    [(name, "table", 0.05) for name in LEARNERS]
    + [(name, "shared", 0.01) for name in ("hepo", "grpo", "hepo_uniform", "sibling_uniform")],
)
def test_every_learner_learns_the_noiseless_bandit(learner, kind, lr):
    """From the uniform policy (share 0), 12 iterations of the library's learner reach a clear share of the
    reachable value on a small noiseless bandit, with a table policy or the shared network."""
    p = TrieProblem(depth=2, branching=4, contexts=4, requests=16, iterations=12, policy=kind, lr=lr)
    curve = run(p, learner, seed=0)
    assert curve[0] == pytest.approx(0.0, abs=1e-12)
    assert curve[-1] > 0.5


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="credit='middle' is unknown"):
        TrieProblem(credit="middle")
    with pytest.raises(ValueError, match="reward='ranked' is unknown"):
        TrieProblem(reward="ranked")
    with pytest.raises(ValueError, match="policy='mlp' is unknown"):
        TrieProblem(policy="mlp")
    with pytest.raises(SystemExit, match="policy='mlp' is unknown"):
        main(["--policy", "mlp", "--out", "/tmp/never"])
    with pytest.raises(SystemExit, match="--lr '0.1,x': expected a comma list of float values"):
        main(["--lr", "0.1,x", "--out", "/tmp/never"])
    with pytest.raises(ValueError, match="leaves is too many"):
        TrieProblem(depth=9, branching=8)
    with pytest.raises(ValueError):
        learner_setup("hepo2")
    assert learner_setup("hepo_uniform")[1].level_weights == "uniform"
    with pytest.raises(SystemExit, match=r"is not branching\^3"):
        main(["--depth", "3", "--leaves", "256", "--seeds", "1", "--out", "/tmp/never"])


def test_the_sweep_writes_its_runs_table_and_figure(tmp_path):
    flags = [
        "--seeds",
        "2",
        "--depth",
        "2",
        "--leaves",
        "16",
        "--credit",
        "early",
    ] + ["--noise", "0,2", "--group", "4", "--iterations", "3", "--workers", "1", "--learners", "hepo,grpo"]
    out = main(["--out", str(tmp_path / "s.1"), *flags])
    runs = json.loads((tmp_path / "s.1.json").read_text())["runs"]  # a dot in OUT stays
    assert len(runs) == 2 * 2 * 2 and all(len(r["curve"]) == 4 for r in runs)  # noises x learners x seeds
    assert list(out["learner"]) == ["hepo", "grpo", "hepo", "grpo"]
    assert (tmp_path / "s.1.md").read_text().startswith("| depth | branching |")
    assert (tmp_path / "s.1.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s.1.curves.png").read_bytes()[:4] == b"\x89PNG"
    # resumed: the runs a stopped sweep finished are read back from OUT.runs.jsonl, the others run again, and the
    # result is the same as one sweep's
    done = tmp_path / "s.1.runs.jsonl"
    lines = done.read_text().splitlines()
    assert len(lines) == 8
    done.write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "s.1.json").unlink()  # (stopped before the end: no OUT.json yet)
    again = main(["--out", str(tmp_path / "s.1"), *flags])
    assert len(done.read_text().splitlines()) == 8
    assert json.loads((tmp_path / "s.1.json").read_text())["runs"] == runs
    pd.testing.assert_frame_equal(again, out)
    # a committed sweep (OUT.json, no resume file) redraws its table and figures without running anything
    done.unlink()
    (tmp_path / "s.1.curves.png").unlink()
    pd.testing.assert_frame_equal(main(["--out", str(tmp_path / "s.1"), *flags]), out)
    assert (tmp_path / "s.1.curves.png").exists() and not done.exists()


def test_a_run_recorded_before_a_setting_existed_is_read_back_at_its_default(capsys):
    """A committed sweep's rows lack settings added later (``max_grad_norm``); they ran at the default, so a sweep at
    the default reads them back instead of running them again, and one at another value runs anew."""
    cells = [TrieProblem(depth=2, branching=2, contexts=2, requests=4, iterations=2)]
    runs = sweep(cells, ["hepo"], seeds=2, workers=1)
    old = [{k: v for k, v in r.items() if k != "max_grad_norm"} for r in runs]
    capsys.readouterr()
    assert sweep(cells, ["hepo"], seeds=2, workers=1, prior=old) == runs
    assert "2 of 2 runs read back" in capsys.readouterr().out
    other = [TrieProblem(depth=2, branching=2, contexts=2, requests=4, iterations=2, max_grad_norm=0.5)]
    assert [r["max_grad_norm"] for r in sweep(other, ["hepo"], seeds=2, workers=1, prior=old)] == [0.5, 0.5]


@pytest.mark.parametrize("max_grad_norm, clipped", [(1e-6, 1.0), (1e6, 0.0)])
def test_the_update_reports_its_gradient_norm_and_whether_the_clip_scaled_it(max_grad_norm, clipped):
    """``agents.rl.loop.update`` logs the mean gradient norm before its one clip over policy and critic, and the share
    of minibatches the clip scaled: every one below a tiny limit, none below a huge one."""
    from agents.rl.loop import update

    p = TrieProblem(depth=2, branching=3, contexts=2, requests=8, group=4, max_grad_norm=max_grad_norm)
    policy = TablePolicy(p)
    with torch.no_grad():
        policy.values.normal_(
            generator=torch.Generator().manual_seed(0)
        )  # a critic error: a non-zero gradient
    buf = collect(policy, TrieBandit(p, seed=0), p, torch.Generator().manual_seed(1), 0, {})
    algo, cfg = learner_setup("hepo")
    buf.adv, buf.returns = algo.targets(buf, cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=0.01)
    schedule = schedule_of(p, seed=0)
    out = update(policy, policy, opt, None, buf, algo, cfg, schedule, 0)
    assert out["train/grad_norm"] > 0 and out["train/grad_clipped"] == clipped
    assert out["train/grad_norm_policy"] > 0 and out["train/grad_norm_critic"] > 0
    # the critic's warm-up: no policy loss, so no policy gradient and no policy step to scale
    warm = update(policy, policy, opt, None, buf, algo, cfg, schedule, 1, policy=False)
    assert warm["train/grad_norm_policy"] == 0 and warm["train/grad_clipped"] == 0
    assert warm["train/grad_norm"] == warm["train/grad_norm_critic"] > 0


@pytest.mark.parametrize("policy", ["table", "shared"])
def test_with_separate_clips_the_critic_does_not_set_the_policys_step(policy):
    """HEPO with uniform level weights whose critic never enters the advantage (``hepo_uniform_gate``) has GRPO's
    policy gradient; only its critic differs. Under one clip over both (a limit the critic's gradient exceeds) the
    critic shrinks HEPO's policy steps and the two part; with ``clip`` separate the policy's step is its own and the
    two learn the same policy to the bit."""
    p = TrieProblem(
        depth=2,
        branching=4,
        contexts=4,
        requests=16,
        group=4,
        iterations=8,
        noise=1.0,
        lr=0.01,
        policy=policy,
        width=16,
        max_grad_norm=0.05,
    )
    joint = [run(p, learner, seed=0) for learner in ("hepo_uniform_gate", "grpo")]
    assert joint[0] != joint[1]
    p = TrieProblem(**{**asdict(p), "clip": "separate"})
    separate = [run(p, learner, seed=0) for learner in ("hepo_uniform_gate", "grpo")]
    assert separate[0] == separate[1]
    with pytest.raises(ValueError, match="clip='both' is unknown"):
        TrieProblem(clip="both")
