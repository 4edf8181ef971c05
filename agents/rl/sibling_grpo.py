"""Sibling-GRPO (V-STAR, arXiv 2602.10699): per-level advantages relative to the paths that share the prefix.

GRPO gives a path one advantage for all its levels, so the coarse choices that most of a group shares are
credited with differences made further down, and paths under a popular prefix get compressed, correlated
advantages. Sibling-GRPO compares each decision only with the alternatives taken from the same node.

**Advantage.** For a request's group of K sampled paths z^1..z^K with rewards R_1..R_K, the siblings of
path i at level l (l = 1..L) are the paths of the group that share its prefix up to level l - 1:
S_l(i) = {j : z^j_<l = z^i_<l} (i itself included; repeated paths count as they were sampled). Then

    A_l(i) = (R_i - mean_{j in S_l(i)} R_j) / (std_{j in S_l(i)} R_j + eps)

with the population std and ``LossConfig.adv_eps``, as ``group_zscore``. At level 1 the prefix is empty, so
S_1(i) is the whole group and A_1 is GRPO's advantage. A path without a sibling at level l (S_l(i) = {i})
gets A_l(i) = 0, which is also what the formula gives for a set of one: the group holds no alternative
to its choice at that node, so it carries no evidence about that choice. Falling back to the group
z-score there would credit level l with the differences made at the coarser levels where the paths
diverged, which those levels' own advantages already carry (the double counting this method removes);
and every path keeps a signal through A_1. Independently sampled groups (``gpr_sim.sampling``) have
fewer siblings at the fine levels than V-STAR's tree-structured sampler, so more fine-level zeros.

**Loss.** HEPO's per-level PPO-clipped surrogate without a critic, -sum_l c_l mean_M PPO-clip(rho_l, A_l)
(``level_surrogate``, c_l = ``LossConfig.level_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import Algorithm, LossConfig, level_surrogate, level_weights


def sibling_zscore(codes: Tensor, reward: Tensor, eps: float = 1e-4) -> Tensor:
    """Sibling-relative advantages (module doc).

    Args:
        codes: (B, K, L) the group's paths.
        reward: (B, K) their rewards R.
        eps: added to the std.

    Returns:
        (B, K, L) A_l: R z-scored among the paths sharing z_<l; 0 where a path has no sibling.

    Memory: (B, K, K) per level (K = 40: 1,600 pairs per request).
    """
    b, k, length = codes.shape
    same = torch.ones(b, k, k, dtype=torch.bool, device=codes.device)  # (B, K, K): z^j_<l == z^i_<l
    r = reward[:, None, :].expand(b, k, k)  # (B, K, K) R_j in row i
    out = reward.new_zeros(b, k, length)
    for level in range(length):  # L is 2-4: a loop over levels, not rows
        w = same.to(reward.dtype)
        n = w.sum(-1)  # (B, K) |S_l(i)| >= 1
        mean = (w * r).sum(-1) / n  # a set of one: R_i exactly, so A = 0
        var = (w * (r - mean[..., None]).square()).sum(-1) / n
        out[..., level] = (reward - mean) / (var.sqrt() + eps)
        same = same & (codes[:, :, None, level] == codes[:, None, :, level])
    return out


def targets(buf: Buffer, cfg: LossConfig) -> tuple[Tensor, None]:
    """(adv (M, K, L), no returns)."""
    return sibling_zscore(buf.codes, buf.reward, cfg.adv_eps), None


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """The per-level clipped surrogate on a minibatch: log_prob (M, K, L) -> (policy, no critic)."""
    length = buf.codes.shape[-1]
    w = level_weights(length, cfg.level_weights).to(log_prob.device)
    policy = level_surrogate(
        log_prob.flatten(0, 1), buf.old_log_prob.flatten(0, 1), buf.adv.flatten(0, 1), w, cfg.clip
    )
    return policy, None


SIBLING_GRPO = Algorithm("sibling_grpo", targets, loss)

__all__ = ["SIBLING_GRPO", "loss", "sibling_zscore", "targets"]
