"""GRPO: the path's reward z-scored within its request's group, at every level; no critic.

Targets: adv = (R - mean_K) / (std_K + eps) per path (``group_zscore``). Loss: the per-level clipped
surrogate with that one advantage at every level, averaged over levels (equal weights).
"""

from __future__ import annotations

from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import Algorithm, LossConfig, clipped_surrogate, group_zscore


def targets(buf: Buffer, cfg: LossConfig) -> tuple[Tensor, None]:
    """(adv (M, K), no returns)."""
    return group_zscore(buf.reward, cfg.adv_eps), None


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    """GRPO: the path's group z-scored advantage (M,) at every level, per-level ratios, mean over levels."""
    return -clipped_surrogate(log_prob, old_log_prob, adv[:, None], cfg.clip).mean()


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``grpo_loss`` on a minibatch: log_prob (M, K, L) -> (policy, no critic)."""
    return grpo_loss(log_prob.flatten(0, 1), buf.old_log_prob.flatten(0, 1), buf.adv.flatten(), cfg), None


GRPO = Algorithm("grpo", targets, loss)

__all__ = ["GRPO", "grpo_loss", "loss", "targets"]
