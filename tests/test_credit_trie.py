"""The trie bandit of ``benchmarks/credit_trie.py``: its policy's terms, its reward, and the learners on it."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.credit_trie import LEARNERS, TablePolicy, TrieBandit, TrieProblem, learner_setup, main, run


def test_the_table_policy_terms_are_its_sampling_distribution():
    """The log-probs the update recomputes are those the paths were drawn with: per path, the levels' log-probs sum
    to the log of its leaf's probability, and the leaves' probabilities sum to 1 per context."""
    p = TrieProblem(depth=3, branching=3, contexts=5)
    policy = TablePolicy(p)
    with torch.no_grad():
        policy.logits.normal_(generator=torch.Generator().manual_seed(0))
    probs = policy.leaf_probs()
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=torch.float64))
    ctx = torch.arange(5).repeat(40)
    codes = policy.sample(ctx, 6, torch.Generator().manual_seed(1))
    log_prob, values = policy.terms(ctx, codes)
    assert log_prob.shape == (200, 6, 3) and values.shape == (200, 6, 4)
    leaf = policy.nodes(codes)[..., -1] - policy.offsets[p.depth]
    torch.testing.assert_close(log_prob.sum(-1).double(), probs[ctx[:, None], leaf].log())
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


def test_the_observed_reward_adds_the_stated_noise():
    p = TrieProblem(depth=2, branching=4, contexts=2, noise=2.0)
    bandit = TrieBandit(p, seed=0)
    ctx, leaf = torch.zeros(50_000, dtype=torch.int64), torch.zeros(50_000, 1, dtype=torch.int64)
    obs = bandit.observe(ctx, leaf, torch.Generator().manual_seed(0))
    assert (
        abs(float(obs.mean()) - float(bandit.reward[0, 0])) < 0.03
    )  # 1.5 standard errors of 2 / sqrt(5e4)... x4
    assert abs(float(obs.std()) - 2.0) < 0.03


@pytest.mark.parametrize("learner", LEARNERS)
def test_every_learner_learns_the_noiseless_bandit(learner):
    """From the uniform policy (share 0), 12 iterations of the library's learner reach a clear share of the
    reachable value on a small noiseless bandit."""
    curve = run(TrieProblem(depth=2, branching=4, contexts=4, requests=16, iterations=12), learner, seed=0)
    assert curve[0] == pytest.approx(0.0, abs=1e-12)
    assert curve[-1] > 0.5


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match="credit='middle' is unknown"):
        TrieProblem(credit="middle")
    with pytest.raises(ValueError, match="leaves is too many"):
        TrieProblem(depth=9, branching=8)
    with pytest.raises(ValueError):
        learner_setup("hepo2")
    with pytest.raises(SystemExit, match=r"is not branching\^3"):
        main(["--depth", "3", "--leaves", "256", "--seeds", "1", "--out", "/tmp/never"])


def test_the_sweep_writes_its_runs_table_and_figure(tmp_path):
    out = main(
        [
            "--out",
            str(tmp_path / "s.1"),
            "--seeds",
            "2",
            "--depth",
            "2",
            "--leaves",
            "16",
            "--credit",
            "early",
        ]
        + ["--noise", "0,2", "--group", "4", "--iterations", "3", "--workers", "1", "--learners", "hepo,grpo"]
    )
    runs = json.loads((tmp_path / "s.1.json").read_text())["runs"]  # a dot in OUT stays
    assert len(runs) == 2 * 2 * 2 and all(len(r["curve"]) == 4 for r in runs)  # noises x learners x seeds
    assert list(out["learner"]) == ["hepo", "grpo", "hepo", "grpo"]
    assert (tmp_path / "s.1.md").read_text().startswith("| depth | branching |")
    assert (tmp_path / "s.1.png").read_bytes()[:4] == b"\x89PNG"
