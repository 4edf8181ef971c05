"""HEPO (GPR §4.3): PPO per level of the semantic-ID path, with the HTE as critic.

Targets: per-level rewards r_l = a_l x max(0, D_l) (the popularity process reward, ``process_rewards``) at
the coarse levels l < L and R at level L; advantages and returns by GAE over the L levels with the HTE
prefix values V(s, z_<l) as the critic; with ``group_norm`` the terminal advantage is replaced by R
z-scored within the request's K paths. Loss: -sum_l c_l mean PPO-clip(rho_l, A_l) plus the critic
sum_l mean (V(s_l) - G_l)^2.
"""

from __future__ import annotations

from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import Algorithm, LossConfig, gae, group_zscore, level_surrogate, level_weights


def targets(buf: Buffer, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """(adv, returns), both (M, K, L): GAE over levels, the terminal one group z-scored (module doc)."""
    m, k, length = buf.codes.shape
    values = buf.old_values[..., :length]  # (M, K, L) V(s, z_<l)
    rewards = buf.process * (cfg.process_scale if cfg.process_rewards else 0.0)  # a_l * max(0, D_l)
    rewards[..., -1] = buf.reward
    adv, ret = gae(rewards.flatten(0, 1), values.flatten(0, 1), cfg.gamma, cfg.lam)
    adv, ret = adv.view(m, k, length), ret.view(m, k, length)
    if cfg.group_norm:
        adv[..., -1] = group_zscore(buf.reward, cfg.adv_eps)
    return adv, ret


def hepo_loss(
    log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, values: Tensor, returns: Tensor, weights: Tensor,
    cfg: LossConfig,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """HEPO: -sum_l c_l mean PPO-clip(rho_l, A_l) and the critic loss sum_l mean (V(s_l) - G_l)^2.

    Args:
        log_prob, old_log_prob, adv: (M, L) per level.
        values: (M, L) current V(s, z_<l); returns: (M, L) G_l from the rollout.
        weights: (L,) c_l.

    Returns:
        (policy loss, critic loss), scalars.
    """
    policy = level_surrogate(log_prob, old_log_prob, adv, weights, cfg.clip)
    critic = (values - returns).pow(2).mean(0).sum()
    return policy, critic


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``hepo_loss`` on a minibatch: log_prob (M, K, L), values (M, K, L + 1) -> (policy, critic)."""
    length = buf.codes.shape[-1]
    w = level_weights(length, cfg.level_weights).to(log_prob.device)
    return hepo_loss(log_prob.flatten(0, 1), buf.old_log_prob.flatten(0, 1), buf.adv.flatten(0, 1),
                     values[..., :length].flatten(0, 1), buf.returns.flatten(0, 1), w, cfg)  # fmt: skip


HEPO = Algorithm("hepo", targets, loss, critic=True)

__all__ = ["HEPO", "hepo_loss", "loss", "targets"]
