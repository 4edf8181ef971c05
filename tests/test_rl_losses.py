"""HEPO / PPO / GRPO / DPO targets and losses, GAE, group z-scores and process rewards (agents.rl.common and
the algorithm files agents.rl.hepo, .ppo, .grpo, .dpo)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.rl.buffer import Buffer
from agents.rl.common import LossConfig, gae, group_zscore, kl_to_reference, level_weights, process_rewards
from agents.rl.dpo import dpo_loss
from agents.rl.dpo import monitor as dpo_monitor
from agents.rl.grpo import grpo_loss
from agents.rl.hepo import EV_KEY, hepo_loss
from agents.rl.ppo import ppo_loss
from agents.rl.registry import algorithm
from gpr_sim.schema import TokenBatch


def _buffer(m: int, k: int, length: int, gen: torch.Generator) -> Buffer:
    """A buffer with random paths, log-probs, values and rewards (tokens are not read by the targets)."""
    tokens = TokenBatch(*(torch.zeros(m, 1) for _ in TokenBatch._fields))
    return Buffer(
        tokens=tokens,
        noise=None,
        codes=torch.randint(0, 4, (m, k, length), generator=gen),
        old_log_prob=-torch.rand(m, k, length, generator=gen),
        legal=[torch.ones(m, k, 4, dtype=torch.bool)] * length,
        old_values=torch.randn(m, k, length + 1, generator=gen),
        reward=torch.randn(m, k, generator=gen),
        process=torch.rand(m, k, length, generator=gen),
        valid=torch.ones(m, dtype=torch.bool),
        rehearsed=torch.zeros(m, dtype=torch.bool),
    )


def compute_targets(buf: Buffer, algo: str, cfg: LossConfig) -> None:
    """What the training loop does with a rollout: the algorithm's targets, stored on the buffer."""
    buf.adv, buf.returns = algorithm(algo).targets(buf, cfg)


def test_gae_matches_a_hand_computed_case():
    rewards = torch.tensor([[0.1, 0.2, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, gamma=0.9, lam=0.8)
    # delta = r_l + 0.9 V_{l+1} - V_l with V after the last level = 0
    d = [0.1 + 0.9 * 0.6 - 0.5, 0.2 + 0.9 * 0.7 - 0.6, 1.0 - 0.7]
    a2 = d[2]
    a1 = d[1] + 0.72 * a2
    a0 = d[0] + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, adv + values)


def test_group_zscore_matches_numpy():
    r = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = (r.numpy() - r.numpy().mean(1, keepdims=True)) / (r.numpy().std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(group_zscore(r, 1e-4).numpy(), ref, rtol=1e-12)


def test_level_weights_default_is_linear():
    torch.testing.assert_close(level_weights(4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(level_weights(2, "uniform"), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown"):
        level_weights(3, "cubic")


def test_hepo_equals_ppo_in_its_degenerate_setting():
    """One level, no process reward, no group normalisation, GAE in use: HEPO's loss is PPO's, term by term.

    Still the degenerate case after the forced-level and critic changes: the one level offers 4 legal
    codes, so it is a decision and the terminal one (weight c = 1 / 1); the buffer has no budget-blind
    reward (``blind_reward`` None: no budgets), so the critic's target is R, as PPO's; and the previous
    rollout's critic explained variance is positive, so HEPO uses GAE, A = R - V(s_0), not the fallback.
    """
    gen = torch.Generator().manual_seed(0)
    cfg = LossConfig(process_rewards=False, group_norm=False)
    buf_h, buf_p = _buffer(6, 5, 1, gen), None
    buf_h.learner_state = {EV_KEY: 0.5}
    buf_p = Buffer(**{f: getattr(buf_h, f) for f in Buffer.__dataclass_fields__})
    compute_targets(buf_h, "hepo", cfg)
    compute_targets(buf_p, "ppo", cfg)
    log_prob = buf_h.old_log_prob + 0.3 * torch.randn(buf_h.old_log_prob.shape, generator=gen)
    values = torch.randn(6, 5, 1, generator=gen)
    pol_h, crit_h = hepo_loss(
        log_prob.flatten(0, 1),
        buf_h.old_log_prob.flatten(0, 1),
        buf_h.adv.flatten(0, 1),
        values.flatten(0, 1),
        buf_h.returns.flatten(0, 1),
        level_weights(1),
        cfg,
    )
    pol_p, crit_p = ppo_loss(
        log_prob.flatten(0, 1),
        buf_p.old_log_prob.flatten(0, 1),
        buf_p.adv.flatten(),
        values.flatten(),
        buf_p.reward.flatten(),
        cfg,
    )
    torch.testing.assert_close(pol_h, pol_p)
    torch.testing.assert_close(crit_h, crit_p)
    assert buf_h.stats["hepo/gae_used"] == 1 and buf_h.stats["hepo/level1_weight"] == 1.0
    # and the switches matter: with group normalisation the terminal advantage is the group z-score
    compute_targets(buf_h, "hepo", LossConfig(process_rewards=False))
    torch.testing.assert_close(buf_h.adv[..., -1], group_zscore(buf_h.reward, 1e-4))


def test_hepo_targets_use_process_rewards_only_at_coarse_levels():
    gen = torch.Generator().manual_seed(1)
    buf = _buffer(4, 3, 3, gen)
    on, off = (
        LossConfig(process_scale=0.1, group_norm=False),
        LossConfig(process_rewards=False, group_norm=False),
    )
    buf.learner_state = {EV_KEY: 0.5}  # GAE in use
    compute_targets(buf, "hepo", on)
    adv_on = buf.adv.clone()
    buf.learner_state = {EV_KEY: 0.5}
    compute_targets(buf, "hepo", off)
    delta = adv_on - buf.adv  # process rewards r_0, r_1 enter through GAE; level L has none
    torch.testing.assert_close(delta[..., 2], torch.zeros_like(delta[..., 2]))
    # a = 0.1 x mean |A_L| / mean max(0, D_l) over the coarse levels, A_L = R - V(s, z_<L) (GAE, no group norm)
    a = 0.1 * (buf.reward - buf.old_values[..., 2]).abs().mean() / buf.process[..., :2].mean()
    g = on.gamma * on.lam
    torch.testing.assert_close(delta[..., 1], a * buf.process[..., 1])
    torch.testing.assert_close(delta[..., 0], a * (buf.process[..., 0] + g * buf.process[..., 1]))


def test_grpo_advantage_is_group_zscore_and_ratio_one_gives_minus_mean():
    gen = torch.Generator().manual_seed(2)
    buf = _buffer(3, 8, 2, gen)
    compute_targets(buf, "grpo", LossConfig())
    torch.testing.assert_close(buf.adv, group_zscore(buf.reward, 1e-4))
    lp = buf.old_log_prob.flatten(0, 1)
    loss = grpo_loss(lp, lp, buf.adv.flatten(), LossConfig())
    torch.testing.assert_close(loss, -buf.adv.mean())


def test_ppo_clips_the_joint_ratio():
    cfg = LossConfig(clip=0.2)
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), 0.2)  # joint ratio e^0.6 ~ 1.82, clipped to 1.2 for a positive advantage
    pol, _ = ppo_loss(new, old, torch.ones(2), torch.zeros(2), torch.zeros(2), cfg)
    torch.testing.assert_close(pol, torch.tensor(-1.2))


def test_dpo_prefers_the_better_path():
    lp_w, lp_l = torch.tensor([-1.0]), torch.tensor([-1.0])
    ref = torch.tensor([-1.0])
    torch.testing.assert_close(dpo_loss(lp_w, lp_l, ref, ref, 0.1), torch.log(torch.tensor(2.0)))
    # the winner one nat more likely than under the reference: -log sigmoid(0.1) = log(1 + e^-0.1) < log 2
    better = dpo_loss(lp_w + 1, lp_l, ref, ref, 0.1)
    assert float(better) == pytest.approx(math.log1p(math.exp(-0.1)), rel=1e-6)
    assert better < dpo_loss(lp_w, lp_l, ref, ref, 0.1)


def test_dpo_monitor_by_hand():
    """DPO's watched terms on three groups of three paths (two levels), the reference at 0: group 0's best is path 1
    (log-ratio 0.1 + 0.3), its worst path 0 (-0.2 - 0.4); group 1's paths tie (no pair); group 2's best is path 2
    (-0.5), its worst path 1 (+0.1)."""
    reward = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, -1.0, 4.0]])
    log_prob = torch.zeros(3, 3, 2)
    log_prob[0, 1] = torch.tensor([0.1, 0.3])
    log_prob[0, 0] = torch.tensor([-0.2, -0.4])
    log_prob[2, 2] = torch.tensor([-0.5, 0.0])
    log_prob[2, 1] = torch.tensor([0.0, 0.1])
    out = dpo_monitor(log_prob, torch.zeros_like(log_prob), SimpleNamespace(reward=reward), LossConfig())
    assert float(out["dpo_chosen_logratio"]) == pytest.approx((0.4 - 0.5) / 2)
    assert float(out["dpo_rejected_logratio"]) == pytest.approx((-0.6 + 0.1) / 2)
    assert float(out["dpo_pairs"]) == pytest.approx(2 / 3)
    assert float(out["dpo_accuracy"]) == 0.5  # group 0's chosen ratio is the larger, group 2's is not
    # no pair at all: finite zeros, not the NaN of an empty mean (a NaN stops the run)
    ties = dpo_monitor(
        log_prob, torch.zeros_like(log_prob), SimpleNamespace(reward=torch.ones(3, 3)), LossConfig()
    )
    assert {k: float(v) for k, v in ties.items()} == dict.fromkeys(ties, 0.0)


def test_kl_to_reference_is_zero_at_the_reference_and_positive_elsewhere():
    lp = -torch.rand(10, 3, generator=torch.Generator().manual_seed(3))
    assert float(kl_to_reference(lp, lp)) == 0.0
    # every path: r = 3 levels x (-0.5) = -1.5, so k3 = exp(-1.5) + 1.5 - 1 = 0.723130 (> 0)
    assert float(kl_to_reference(lp, lp - 0.5)) == pytest.approx(math.exp(-1.5) + 0.5, rel=1e-6)


def test_process_rewards_hand_case():
    """Two levels; the user's positives are paths (0, 1), (0, 2), (1, 0): P_0(0) = 2/3, P_0(1) = 1/3."""
    codes = torch.tensor([[[0, 0], [1, 0], [2, 0]]])  # (1, 3, 2)
    legal0 = torch.tensor([[[True, True, True]]]).expand(1, 3, 3)  # S_0 = {0, 1, 2}
    legal1 = torch.ones(1, 3, 3, dtype=torch.bool)
    positives = torch.tensor([[[0, 1], [0, 2], [1, 0], [-1, -1]]])
    r = process_rewards(codes, [legal0, legal1], positives, scale=0.5)
    mean = (2 / 3 + 1 / 3 + 0) / 3  # mean popularity over the legal codes
    expected0 = torch.tensor([0.5 * (2 / 3 - mean), 0.5 * max(0.0, 1 / 3 - mean), 0.0])
    torch.testing.assert_close(r[0, :, 0], expected0)
    torch.testing.assert_close(r[0, :, 1], torch.zeros(3))  # the last level has no process reward
    # a user without positives gets none
    r0 = process_rewards(codes, [legal0, legal1], torch.full((1, 4, 2), -1), scale=0.5)
    assert float(r0.abs().sum()) == 0.0


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="clip"):
        LossConfig(clip=1.5)
    with pytest.raises(ValueError, match="level_weights"):
        LossConfig(level_weights="quadratic")
    with pytest.raises(ValueError, match="kl_coef"):
        LossConfig(kl_coef=-1.0)
    for name in ("process_scale", "value_coef", "dpo_beta", "adv_eps"):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"{name}=.*finite"):
                LossConfig(**{name: bad})
