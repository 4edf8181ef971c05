"""What the RL algorithms share: the loss constants, advantage pieces, surrogates, and the algorithm unit.

A path z_1..z_L is L actions taken in L states s_l = (request, z_<l). Every function here is pure
tensor math over a flat batch of M paths (M = requests x group size), so the learners share one rollout
buffer (``agents.rl.buffer``) and one training loop (``agents.rl.loop``) and differ only in their
``Algorithm`` (one file each, named in ``agents.rl.registry``):

| algo | advantage | ratio | critic |
|---|---|---|---|
| hepo | GAE over levels with HTE as critic, process rewards r_l (l < L), terminal level z-scored in the group | per level, weighted by c_l | sum_l (V(s_l) - G_l)^2 |
| ppo  | R - V(s_0) (terminal reward only) | joint: exp(sum_l log-ratio) | (V(s_0) - R)^2 |
| grpo | (R - mean_K) / (std_K + eps), no critic, no process reward | per level, equal weights | none |
| sibling_grpo | level l: R z-scored among the group's paths sharing z_<l (0 without a sibling) | per level, weighted by c_l | none |
| dpo  | none: best vs worst path of a group, against the frozen reference | none | none |

Any learner may add ``kl_coef`` x KL(pi || pi_VAFT) (``kl_to_reference``). All learners also regress the HTE value of the full path on R (``item_value_loss``): that value ranks
beams and candidates at serving time, and it does not touch the policy gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from agents.rl.buffer import Buffer


@dataclass(frozen=True)
class LossConfig:
    """Constants of the RL losses (GPR §4.3 DEFAULT values where the paper gives them)."""

    clip: float = 0.2
    """PPO clip range eps"""
    gamma: float = 0.99
    """discount between levels"""
    lam: float = 0.95
    """GAE lambda"""
    level_weights: str = "linear"
    """c_l of the per-level objective: linear (c_l = l / L, GPR DEFAULT) | uniform (1 / L)"""
    process_scale: float = 0.05
    """a_l: weight of the popularity process reward at the coarse levels (GPR: 0.05-0.1)"""
    process_rewards: bool = True
    """HEPO process rewards at levels l < L (off = terminal reward only; ablation)"""
    group_norm: bool = True
    """HEPO: z-score the terminal advantage within the request's group (off = GAE there too)"""
    adv_eps: float = 1e-4
    """eps of (std_K + eps) in group z-scores"""
    value_coef: float = 0.5
    """weight of the critic loss (and of the item-value regression)"""
    dpo_beta: float = 0.1
    """DPO temperature beta"""
    kl_coef: float = 0.0
    """weight of the KL penalty to the frozen VAFT generator (k3 estimate on the sampled paths); 0 = none"""

    def __post_init__(self) -> None:
        for name in ("clip", "gamma", "lam", "process_scale", "adv_eps", "value_coef", "dpo_beta", "kl_coef"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} is invalid: expected a finite number")
        if not 0.0 < self.clip < 1.0:
            raise ValueError(f"clip={self.clip} is invalid: expected in (0, 1)")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected in [0, 1]")
        if self.level_weights not in ("linear", "uniform"):
            raise ValueError(f"level_weights={self.level_weights!r} is invalid: expected linear | uniform")
        for name in ("process_scale", "value_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected >= 0")
        for name in ("adv_eps", "dpo_beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected > 0")


# ----------------------------------------------------------------------------- advantages


def level_weights(path_len: int, kind: str = "linear") -> Tensor:
    """(L,) c_l: ``linear`` = l / L for l = 1..L (fine levels weigh more), ``uniform`` = 1 / L."""
    if kind == "linear":
        return torch.arange(1, path_len + 1, dtype=torch.float32) / path_len
    if kind == "uniform":
        return torch.full((path_len,), 1.0 / path_len)
    raise ValueError(f"level weights {kind!r} are unknown: expected linear | uniform")


def group_zscore(reward: Tensor, eps: float = 1e-4) -> Tensor:
    """(B, K) -> (B, K) (R - mean_K) / (std_K + eps), population std over the group."""
    mean = reward.mean(-1, keepdim=True)
    std = reward.std(-1, unbiased=False, keepdim=True)
    return (reward - mean) / (std + eps)


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over the L levels of a path, which ends after level L (terminal value 0).

    Args:
        rewards: (M, L) r_l received after choosing z_l.
        values: (M, L) V(s, z_<l): the critic in the state where z_l is chosen.

    Returns:
        advantages (M, L) and returns G_l = A_l + V(s, z_<l) (M, L).
    """
    m, length = rewards.shape
    next_value = torch.cat([values[:, 1:], values.new_zeros(m, 1)], 1)  # V(s, z_<=l); 0 after the item
    delta = rewards + gamma * next_value - values
    adv = torch.zeros_like(delta)
    running = delta.new_zeros(m)
    for level in reversed(range(length)):  # L is 2-4: a loop over levels, not rows
        running = delta[:, level] + gamma * lam * running
        adv[:, level] = running
    return adv, adv + values


def process_rewards(
    codes: Tensor, legal: list[Tensor], positives: Tensor, scale: float
) -> Tensor:
    """Popularity process rewards of the coarse levels (GPR §4.3), 0 at the last level.

    ``P_l(t)`` is the share of the user's positive items whose path starts with ``(z_<l, t)``;
    ``D_l = P_l(z_l) - mean_{t in S_l} P_l(t)`` over the legal codes S_l; ``r_l = scale * max(0, D_l)``.

    Args:
        codes: (B, K, L) sampled paths.
        legal: L masks (B, K, K_l) of the legal codes at each level.
        positives: (B, H, L) paths of each user's positive items (clicked / converted ads and consumed
            organic items), -1 rows = padding.
        scale: a_l.

    Returns:
        (B, K, L) float32 rewards.
    """
    b, k, length = codes.shape
    real = (positives >= 0).all(-1)  # (B, H)
    n_pos = real.sum(1).clamp_min(1).float()[:, None]  # (B, 1)
    pos = positives.clamp_min(0)[:, None]  # (B, 1, H, L)
    out = codes.new_zeros(b, k, length, dtype=torch.float32)
    same_prefix = real[:, None].expand(b, k, -1)  # (B, K, H): positives sharing z_<l
    for level in range(length - 1):
        code_l = pos[..., level].expand(b, k, -1)  # (B, K, H)
        hit = same_prefix & (code_l == codes[..., level : level + 1])  # positives with prefix z_<=l
        legal_l = legal[level]
        in_legal = same_prefix & legal_l.gather(2, code_l)  # positives below some legal t
        size = legal_l.sum(-1).clamp_min(1).float()  # |S_l|
        d = (hit.sum(-1).float() - in_legal.sum(-1).float() / size) / n_pos
        out[..., level] = scale * d.clamp_min(0.0)
        same_prefix = hit
    return out


# ----------------------------------------------------------------------------- losses


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, clip: float) -> Tensor:
    """PPO's clipped objective per element (to maximise): min(rho A, clip(rho, 1-eps, 1+eps) A)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)


def level_surrogate(log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, weights: Tensor, clip: float) -> Tensor:
    """Per-level PPO policy loss -sum_l c_l mean_M PPO-clip(rho_l, A_l) (HEPO's objective, GPR §4.3).

    Args:
        log_prob, old_log_prob, adv: (M, L) per level.
        weights: (L,) c_l.

    Returns:
        the loss (to minimise), a scalar.
    """
    surr = clipped_surrogate(log_prob, old_log_prob, adv, clip).mean(0)  # (L,)
    return -(weights.to(surr) * surr).sum()


def kl_to_reference(log_prob: Tensor, ref_log_prob: Tensor) -> Tensor:
    """(M, L) log-probs of sampled paths under the policy and the reference -> k3 estimate of KL(pi || ref).

    Per path, with r = log ref - log pi summed over levels: exp(r) - r - 1 >= 0 (unbiased for samples
    from pi, low variance; GRPO's estimator).
    """
    r = (ref_log_prob - log_prob).sum(-1)
    return (torch.exp(r) - r - 1.0).mean()


def item_value_loss(item_value: Tensor, reward: Tensor) -> Tensor:
    """(M,) HTE value of the full path vs its reward R: mean squared error."""
    return (item_value - reward).pow(2).mean()


# ----------------------------------------------------------------------------- the algorithm unit

Targets = Callable[[Buffer, LossConfig], tuple[Tensor | None, Tensor | None]]
"""(buffer, constants) -> (adv, returns): the algorithm's training targets from a rollout"""
Loss = Callable[[Tensor, Tensor, Tensor | None, Buffer, LossConfig], tuple[Tensor, Tensor | None]]
"""(log_prob (M, K, L), values (M, K, L + 1), reference log_prob (M, K, L) or None, minibatch, constants)
-> (policy loss, critic loss or None): the algorithm's loss on the current policy's terms"""


@dataclass(frozen=True)
class Algorithm:
    """One RL algorithm: what it learns from (``targets``) and how (``loss``), and what it needs.

    The training loop (``agents.rl.loop``) is the same for all: it calls ``targets`` once per rollout, and
    per minibatch ``loss`` on the current log-probs and HTE values of the buffer's paths; it adds the
    item-value regression and the optional KL penalty itself. A new algorithm is one file that builds one
    of these and one line in ``agents.rl.registry``.
    """

    name: str
    """the ``--algo`` value"""
    targets: Targets
    """(adv, returns) of a rollout; the caller stores them on the buffer (``Buffer.adv``, ``Buffer.returns``)"""
    loss: Loss
    """returns (policy, critic); critic None when ``critic`` is False"""
    critic: bool = False
    """its loss trains the HTE prefix values V(s, z_<l) as a critic"""
    reference: bool = False
    """its loss reads the frozen reference policy's log-probs (the VAFT generator)"""

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"name={self.name!r} is invalid: expected an identifier (the --algo value)")
        for field in ("targets", "loss"):
            if not callable(getattr(self, field)):
                raise ValueError(f"{self.name}: {field} is invalid: expected a function")


__all__ = [
    "Algorithm",
    "LossConfig",
    "level_weights",
    "group_zscore",
    "gae",
    "process_rewards",
    "clipped_surrogate",
    "level_surrogate",
    "item_value_loss",
    "kl_to_reference",
]
