"""HEPO's credit assignment (agents.rl.hepo): forced levels, the terminal decision, the critic's explained
variance and the GAE fallback, the process-reward share, the per-level statistics; end to end in
agents.hepo (the statistics logged, the fallback state through a resume)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import agents.hepo as hepo
import agents.rl.common as common
from agents.policies.gpr import load_run_model
from agents.rl import checkpoint
from agents.rl.buffer import Buffer
from agents.rl.common import (
    LossConfig,
    explained_variance,
    forced_levels,
    semantic_level_weights,
    terminal_level,
)
from agents.rl.hepo import EV_KEY, GROUP_EV_KEY, loss, targets
from gpr_sim.schema import TokenBatch
from tests.test_hepo import pre, tiny  # noqa: F401  (the module fixture: a tiny pre-trained generator)

EPS = 1e-4
C = 1 / (1 + EPS)  # |z| of a group of two rewards: (R - mean) / (std + eps) with |R - mean| = std
CFG = LossConfig(gamma=0.9, lam=0.8, process_rewards=False)  # gamma lambda = 0.72


def hand_buffer(counts, reward, values, process=None, valid=None, state=None) -> Buffer:
    """A buffer whose path (m, k) offered ``counts[m][k][l]`` legal codes at level l (of 3) and took code 0.

    Args:
        counts: (M, K, L) ints; values: (M, K, L + 1) V(s, z_<l) and the item value; reward: (M, K).
    """
    counts = torch.tensor(counts)
    m, k, length = counts.shape
    legal = [torch.arange(3) < counts[..., lvl, None] for lvl in range(length)]  # L of (M, K, 3)
    tokens = TokenBatch(*(torch.zeros(m, 1) for _ in TokenBatch._fields))  # not read by the targets
    return Buffer(
        tokens=tokens,
        noise=None,
        codes=torch.zeros(m, k, length, dtype=torch.int64),
        old_log_prob=torch.zeros(m, k, length),
        legal=legal,
        old_values=torch.tensor(values),
        reward=torch.tensor(reward),
        process=torch.zeros(m, k, length) if process is None else torch.tensor(process),
        valid=torch.ones(m, dtype=torch.bool) if valid is None else torch.tensor(valid),
        rehearsed=torch.zeros(m, dtype=torch.bool),
        learner_state=state,
    )


def forced_case(state=None) -> Buffer:
    """One request, two paths of three levels: path 0 chose at levels 1 and 2 (level 3, the disambiguation
    digit, forced); path 1 chose at levels 1 and 3 (level 2 forced: a node with one child). R = 1, 3."""
    return hand_buffer(
        counts=[[[3, 2, 1], [3, 1, 2]]],
        reward=[[1.0, 3.0]],
        values=[[[0.5, 1.0, 7.0, 0.0], [1.5, 9.0, 2.0, 0.0]]],
        state=state,
    )


def test_forced_levels_terminal_level_and_weights_by_hand():
    buf = forced_case()
    free = ~forced_levels(buf.legal)
    assert free.tolist() == [[[True, True, False], [True, False, True]]]
    assert terminal_level(free).tolist() == [[[False, True, False], [False, False, True]]]
    # linear c over the n = 2 decisions of each path: 1/2 then 2/2 = 1; the forced level 0
    torch.testing.assert_close(
        semantic_level_weights(free), torch.tensor([[[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    )
    torch.testing.assert_close(
        semantic_level_weights(free, "uniform"), torch.tensor([[[0.5, 0.5, 0], [0.5, 0, 0.5]]])
    )
    # every level free: the plain c_l = l / L; no decision at all: no weight
    every = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(semantic_level_weights(every), torch.tensor([[1 / 3, 2 / 3, 1.0]]))
    assert semantic_level_weights(~every).abs().sum() == 0 and not terminal_level(~every).any()


def test_forced_levels_counted_in_chunks_equal_the_plain_count():
    """The chunked count (bounded memory: ``sum`` of a bool mask copies it to int64) equals the plain one,
    with one row per chunk and with a ragged last chunk."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 7, 6, generator=g) < torch.rand(5, 7, 1, generator=g) * 0.4  # counts 0, 1 and more
    want = mask.sum(-1) <= 1
    assert want.any() and not want.all()
    for cells in (1, 4 * 6, 1 << 26):
        assert torch.equal(common._at_most_one(mask, cells), want)


def test_group_baseline_puts_the_z_score_on_every_decision_and_nothing_on_forced_levels():
    """No previous critic EV: the fallback. z = (R - 2) / (1 + eps) = -C, +C at each path's decisions."""
    buf = forced_case()
    adv, ret = targets(buf, CFG)
    torch.testing.assert_close(adv, torch.tensor([[[-C, -C, 0.0], [C, 0.0, C]]]))
    assert buf.stats["hepo/gae_used"] == 0


def test_gae_skips_forced_levels_and_the_terminal_z_score_lands_on_the_last_decision():
    """GAE on (previous EV 0.5), gamma 0.9, lambda 0.8, group z-score at the terminal decision.

    Path 0 (decisions 1, 2; V = 0.5, 1.0; forced level 3's V = 7 ignored):
      level 2: delta = R - V = 1 - 1 = 0 -> A = 0, G = 1.0; A replaced by z = -C (terminal)
      level 1: delta = 0.9 x 1.0 - 0.5 = 0.4 -> A = 0.4 + 0.72 x 0 = 0.4, G = 0.9
    Path 1 (decisions 1, 3; V = 1.5, 2.0; forced level 2's V = 9 ignored):
      level 3: delta = 3 - 2 = 1 -> A = 1, G = 3.0; A replaced by z = +C
      level 2: forced: A = 0, G = V = 9 (no critic term)
      level 1: delta = 0.9 x 2.0 (the next decision's V) - 1.5 = 0.3 -> A = 0.3 + 0.72 x 1 = 1.02, G = 2.52
    Critic EV at the first decisions: G = (0.9, 2.52), V = (0.5, 1.5): Var G = 0.81^2 = 0.6561,
    G - V = (0.4, 1.02): Var = 0.31^2 = 0.0961 -> EV = 1 - 0.0961 / 0.6561.
    """
    state = {EV_KEY: 0.5}
    buf = forced_case(state)
    buf.adv, buf.returns = targets(buf, CFG)
    torch.testing.assert_close(buf.adv, torch.tensor([[[0.4, -C, 0.0], [1.02, 0.0, C]]]))
    torch.testing.assert_close(buf.returns, torch.tensor([[[0.9, 1.0, 7.0], [2.52, 9.0, 3.0]]]))
    ev = 1 - 0.0961 / 0.6561
    assert buf.stats["hepo/gae_used"] == 1
    assert buf.stats["hepo/critic_ev"] == pytest.approx(ev) and state[EV_KEY] == pytest.approx(ev)
    assert buf.stats["hepo/group_ev"] == pytest.approx(0.0, abs=1e-9)  # one group: its mean explains nothing
    # without the group z-score the terminal advantages are GAE's: 0 and 1
    adv, _ = targets(
        forced_case({EV_KEY: 0.5}), LossConfig(gamma=0.9, lam=0.8, process_rewards=False, group_norm=False)
    )
    torch.testing.assert_close(adv[..., 1:], torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
    # the loss at ratio 1: policy -mean_paths sum_l c_l A_l = -((0.5 x 0.4 - C) + (0.5 x 1.02 + C)) / 2 = -0.355;
    # critic with every value 1 off its target: sum over levels of the share of paths deciding there,
    # 1 + 1/2 + 1/2 = 2 (forced levels have no critic term)
    values = torch.cat([buf.returns + 1.0, torch.zeros(1, 2, 1)], -1)
    policy, critic = loss(buf.old_log_prob, values, None, buf, CFG)
    torch.testing.assert_close(policy, torch.tensor(-0.355))
    torch.testing.assert_close(critic, torch.tensor(2.0))


def test_a_request_without_a_decision_gets_no_advantage_no_weight_and_no_statistics():
    """Request 1 had one eligible ad whose path is forced throughout; request 0 is ``forced_case``'s."""
    buf = hand_buffer(
        counts=[[[3, 2, 1], [3, 1, 2]], [[1, 1, 1], [1, 1, 1]]],
        reward=[[1.0, 3.0], [2.0, 2.0]],
        values=[[[0.5, 1.0, 7.0, 0.0], [1.5, 9.0, 2.0, 0.0]], [[5.0, 5.0, 5.0, 0.0]] * 2],
        state={EV_KEY: 0.5},
    )
    buf.adv, buf.returns = targets(buf, CFG)
    assert buf.adv[1].abs().sum() == 0
    policy, _ = loss(buf.old_log_prob, torch.zeros(2, 2, 4), None, buf, CFG)
    torch.testing.assert_close(policy, torch.tensor(-0.355 / 2))  # request 1's paths add 0 to the mean
    assert buf.stats["hepo/critic_ev"] == pytest.approx(1 - 0.0961 / 0.6561)  # request 0's decisions only
    assert buf.stats["hepo/level1_forced_frac"] == 0.5  # 2 of the 4 paths were forced at level 1


def test_explained_variance_by_hand():
    # target (1, 2, 3, 4): Var = 1.25; error (0, 0, 1, -1): Var = 0.5 -> 1 - 0.5 / 1.25 = 0.6
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, torch.tensor([1.0, 2.0, 2.0, 5.0])) == pytest.approx(0.6)
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(target, torch.full((4,), 2.5)) == pytest.approx(
        0.0
    )  # the mean explains nothing
    # worse than the mean: error 2 * target, Var = 4 * 1.25 = 5 -> 1 - 5 / 1.25 = -3
    assert explained_variance(target, -target) == pytest.approx(-3.0)
    assert explained_variance(torch.full((4,), 3.0), torch.zeros(4)) == 0.0  # nothing to explain
    assert explained_variance(torch.zeros(0), torch.zeros(0)) == 0.0


def test_group_ev_is_what_the_group_mean_explains():
    """One level, G = R: requests (1, 3) and (5, 7). Var G = (9 + 1 + 1 + 9) / 4 = 5 around 4; around the
    group means 2 and 6 every G is 1 off: Var = 1 -> group EV 1 - 1/5 = 0.8. A zero critic explains 0."""
    buf = hand_buffer(counts=[[[3]] * 2] * 2, reward=[[1.0, 3.0], [5.0, 7.0]], values=[[[0.0, 0.0]] * 2] * 2)
    targets(buf, CFG)
    assert buf.stats["hepo/group_ev"] == pytest.approx(0.8)
    assert buf.stats["hepo/critic_ev"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("previous", "used"), [(None, 0), (-0.2, 0), (0.0, 0), (1e-3, 1), (0.3, 1)])
def test_gae_is_used_only_after_a_positive_critic_ev(previous, used):
    state = {} if previous is None else {EV_KEY: previous}
    buf = forced_case(state)
    adv, _ = targets(buf, CFG)
    assert buf.stats["hepo/gae_used"] == used
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([0.4, 1.02]) if used else torch.tensor([-C, C]))
    # this rollout's EV replaces the previous one: positive here, so the next rollout uses GAE
    assert state[EV_KEY] == pytest.approx(1 - 0.0961 / 0.6561)
    targets(buf, CFG)
    assert buf.stats["hepo/gae_used"] == 1


@pytest.mark.parametrize(
    ("previous", "used"),
    [
        ({EV_KEY: 0.3}, 0),  # no group EV yet: the critic has nothing it has beaten
        ({EV_KEY: 0.3, GROUP_EV_KEY: 0.5}, 0),  # positive, but below the group baseline
        ({EV_KEY: 0.6, GROUP_EV_KEY: 0.5}, 1),
        ({EV_KEY: 0.1, GROUP_EV_KEY: -0.2}, 1),  # a group mean worse than none: the bar stays at 0
        ({EV_KEY: -0.1, GROUP_EV_KEY: -0.2}, 0),
    ],
)
def test_gae_gate_group_asks_the_critic_to_beat_the_group_mean(previous, used):
    cfg = dataclasses.replace(CFG, gae_gate="group")
    state = dict(previous)
    buf = forced_case(state)
    adv, _ = targets(buf, cfg)
    assert buf.stats["hepo/gae_used"] == used
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([0.4, 1.02]) if used else torch.tensor([-C, C]))
    # this rollout's two EVs are kept for the next decision
    assert state[EV_KEY] == pytest.approx(buf.stats["hepo/critic_ev"])
    assert state[GROUP_EV_KEY] == pytest.approx(buf.stats["hepo/group_ev"])
    with pytest.raises(ValueError, match="gae_gate='always' is unknown"):
        LossConfig(gae_gate="always")


def test_process_rewards_are_a_stated_share_of_the_terminal_advantage():
    """Request 0 (valid): max(0, D) = (0.2, 0) on path 0's coarse levels, (0.1, 0.1) on path 1's; R = 1, 3.
    Request 1 has no eligible ad (invalid): its large process rewards are left out of the means.

    mean |A_t| = |z| = C; mean max(0, D) over the 4 coarse decisions = 0.4 / 4 = 0.1;
    a = 0.1 x C / 0.1 = C. Group baseline (no previous EV), gamma 0.9: A_l = z + the process rewards to come:
      path 0: level 1: -C + C (0.2 + 0.9 x 0) = -0.8 C; level 2: -C + 0 = -C; level 3: -C
      path 1: level 1: C + C (0.1 + 0.9 x 0.1) = 1.19 C; level 2: C + 0.1 C = 1.1 C; level 3: C
    """
    kw = dict(
        counts=[[[3, 3, 3]] * 2] * 2,
        reward=[[1.0, 3.0], [0.0, 0.0]],
        values=[[[0.0] * 4] * 2] * 2,
        process=[[[0.2, 0.0, 0.0], [0.1, 0.1, 0.0]], [[5.0, 5.0, 0.0]] * 2],
        valid=[True, False],
    )
    buf = hand_buffer(**kw)
    adv, _ = targets(buf, LossConfig(gamma=0.9, lam=0.8, process_scale=0.1))
    torch.testing.assert_close(adv[0], torch.tensor([[-0.8 * C, -C, -C], [1.19 * C, 1.1 * C, C]]))
    assert buf.stats["hepo/process_coef"] == pytest.approx(C)
    assert buf.stats["hepo/process_share"] == pytest.approx(0.1)
    # a share of 0.05 halves a; the ablation switch turns them off
    buf = hand_buffer(**kw)
    targets(buf, LossConfig(gamma=0.9, lam=0.8, process_scale=0.05))
    assert buf.stats["hepo/process_coef"] == pytest.approx(C / 2)
    buf = hand_buffer(**kw)
    adv, _ = targets(buf, LossConfig(gamma=0.9, lam=0.8, process_rewards=False))
    torch.testing.assert_close(adv[0], torch.tensor([[-C] * 3, [C] * 3]))
    assert buf.stats["hepo/process_share"] == 0.0 and buf.stats["hepo/process_coef"] == 0.0


def test_per_level_statistics_by_hand():
    """``forced_case`` under the group baseline: advantages (-C, -C, 0), (C, 0, C)."""
    buf = forced_case()
    targets(buf, CFG)
    s = buf.stats
    # level 1: both paths decide, A = -C, C: mean 0, std C; level 2: path 0 alone (-C); level 3: path 1 alone (C)
    assert [s[f"hepo/level{lvl}_adv_mean"] for lvl in (1, 2, 3)] == pytest.approx([0.0, -C, C])
    assert [s[f"hepo/level{lvl}_adv_std"] for lvl in (1, 2, 3)] == pytest.approx([C, 0.0, 0.0], abs=1e-6)
    assert [s[f"hepo/level{lvl}_forced_frac"] for lvl in (1, 2, 3)] == [0.0, 0.5, 0.5]
    # mean c_l over the two paths: (1/2 + 1/2) / 2, (1 + 0) / 2, (0 + 1) / 2
    assert [s[f"hepo/level{lvl}_weight"] for lvl in (1, 2, 3)] == [0.5, 0.5, 0.5]
    # a level where no path decides has no advantage statistics
    buf = hand_buffer(counts=[[[3, 2, 1], [3, 3, 1]]], reward=[[1.0, 3.0]], values=[[[0.0] * 4] * 2])
    targets(buf, CFG)
    assert math.isnan(buf.stats["hepo/level3_adv_mean"]) and buf.stats["hepo/level3_forced_frac"] == 1.0


# ----------------------------------------------------------------------------- end to end


def _hepo_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["iteration"] > 0]


def test_statistics_are_logged_and_the_fallback_state_survives_a_resume(pre, tmp_path):  # noqa: F811
    _, tok = load_run_model(pre / "vaft")
    length = tok.trie.depth
    out = tmp_path / "run"
    hepo.main(tiny(pre, out, "--iterations", "2"))
    rows = _hepo_rows(out)
    want = {"hepo/critic_ev", "hepo/group_ev", "hepo/gae_used", "hepo/process_share", "hepo/process_coef"} | {
        f"hepo/level{lvl}_{m}"
        for lvl in range(1, length + 1)
        for m in ("adv_mean", "adv_std", "forced_frac", "weight")
    }
    for row in rows:
        assert {k for k in row if k.startswith("hepo/")} == want
        assert all(math.isfinite(row[k]) for k in want if "_adv_" not in k)
        assert row["hepo/process_share"] == pytest.approx(0.1) or row["hepo/process_coef"] == 0.0
    assert rows[0]["hepo/gae_used"] == 0  # no critic EV before the first rollout
    assert rows[1]["hepo/gae_used"] == int(rows[0]["hepo/critic_ev"] > 0)
    # the checkpoint holds the last rollout's EV; resumed, the run decides by it: flip its sign and the
    # third iteration uses the other advantages
    ckpt = checkpoint.read_checkpoint(out / "checkpoint.pt")
    saved = ckpt["rollers"][0]["learner_state"][EV_KEY]
    assert saved == pytest.approx(rows[1]["hepo/critic_ev"])
    flipped = -1.0 if saved > 0 else 1.0
    ckpt["rollers"][0]["learner_state"][EV_KEY] = flipped
    torch.save(ckpt, out / "checkpoint.pt")  # the payload read back holds its format header
    hepo.main(tiny(pre, out, "--iterations", "3"))
    rows = _hepo_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[2]["hepo/gae_used"] == int(flipped > 0)
