"""PPO on whole paths: the terminal reward only, one joint ratio over the L levels, V(s_0) as critic.

Targets: adv = R - V(s_0) (the HTE value of the request before the first level); the critic regresses
V(s_0) on R itself. Loss: -mean PPO-clip(exp(sum_l log-ratio_l), adv) plus (V(s_0) - R)^2.
"""

from __future__ import annotations

from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import Algorithm, LossConfig, clipped_surrogate


def targets(buf: Buffer, cfg: LossConfig) -> tuple[Tensor, None]:
    """(adv (M, K), no returns: the critic target is ``buf.reward``)."""
    length = buf.codes.shape[-1]
    values = buf.old_values[..., :length]  # (M, K, L) V(s, z_<l)
    return buf.reward - values[..., 0], None


def ppo_loss(
    log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, value: Tensor, ret: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor]:
    """PPO on whole paths: joint ratio exp(sum_l log-ratio), advantage (M,), critic (V(s_0) - R)^2."""
    surr = clipped_surrogate(log_prob.sum(-1), old_log_prob.sum(-1), adv, cfg.clip)
    return -surr.mean(), (value - ret).pow(2).mean()


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``ppo_loss`` on a minibatch: log_prob (M, K, L), values (M, K, L + 1) -> (policy, critic)."""
    return ppo_loss(
        log_prob.flatten(0, 1),
        buf.old_log_prob.flatten(0, 1),
        buf.adv.flatten(),
        values[..., 0].flatten(),
        buf.reward.flatten(),
        cfg,
    )


PPO = Algorithm("ppo", targets, loss, critic=True)

__all__ = ["PPO", "loss", "ppo_loss", "targets"]
