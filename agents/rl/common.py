"""What the RL algorithms share: the loss constants, advantage pieces, surrogates, and the algorithm unit.

A path z_1..z_L is L actions taken in L states s_l = (request, z_<l). Every function here is pure
tensor math over a flat batch of M paths (M = requests x group size), so the learners share one rollout
buffer (``agents.rl.buffer``) and one training loop (``agents.rl.loop``) and differ only in their
``Algorithm`` (one file each, named in ``agents.rl.registry``):

| algo | advantage | ratio | critic |
|---|---|---|---|
| hepo | GAE over the semantic levels with HTE as critic, process rewards r_l at the coarse ones, the last one z-scored in the group | per level, weighted by c_l over the semantic levels | sum_l (V(s_l) - G_l)^2, budget-blind |
| ppo  | R - V(s_0) (terminal reward only) | joint: exp(sum_l log-ratio) | (V(s_0) - R)^2 |
| grpo | (R - mean_K) / (std_K + eps), no critic, no process reward | per level, equal weights | none |
| sibling_grpo | level l: R z-scored among the group's paths sharing z_<l (0 without a sibling) | per level, weighted by c_l | none |
| dpo  | none: best vs worst path of a group, against the frozen reference | none | none |

Any learner may add ``kl_coef`` x KL(pi || pi_VAFT) (``kl_to_reference``). All learners also regress the HTE value of the full path on R (``item_value_loss``): that value ranks
beams and candidates at serving time, and it does not touch the policy gradient.

**Forced levels.** A level whose legal mask holds one code for that path (``forced_levels``: the
tokenizer's disambiguation digit when no other item shares the semantic path, or a trie node with one
child) is not an action: its log-prob is exactly 0 and has no gradient. HEPO gives such a level no
advantage and no weight and puts its terminal z-score on the path's last non-forced level
(``terminal_level``), with c_l over the non-forced levels (``semantic_level_weights``). GRPO and
Sibling-GRPO are left as they are: every level carries its own advantage there (GRPO's one z-score at each
level, Sibling-GRPO's per-level one), so a forced level loses no credit that another level would have had;
it only adds a constant to the loss (ratio 1) and, under Sibling-GRPO's c_l = l / L', takes a weight that
scales the whole loss, which Adam's per-parameter normalisation undoes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.distributed import SINGLE, Dist, all_reduce_sum

GAE_GATES = ("positive", "group")
"""``LossConfig.gae_gate``: what the HTE critic's explained variance must clear for HEPO to use GAE"""


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
    """c_l of the per-level objective: linear (c_l = l / L, GPR DEFAULT) | uniform (1 / L); HEPO counts l and L
    over a path's non-forced levels (``semantic_level_weights``)"""
    process_scale: float = 0.1
    """HEPO process reward as a share of the advantage (GPR's a_l = 0.05-0.1 read as that share): each rollout
    sets a = process_scale x mean |A_T| / mean max(0, D_l), so that the process term a max(0, D_l) has a mean
    absolute value of process_scale x the mean absolute terminal advantage A_T (the means over the valid
    requests' paths; D_l over their coarse levels: non-forced, before the terminal one); logged as
    ``hepo/process_share``. A fixed a would be read against advantages of whatever scale the rewards have
    (z-scores near 1 against D_l of order 0.01 made the process reward vanish)"""
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
    gae_gate: str = "positive"
    """HEPO: when the coarse levels' advantages use GAE against the HTE critic instead of the group baseline:
    ``positive`` once the previous rollout's critic explained variance is above 0 (the issue's rule), ``group``
    only once it is also above what the group's mean return explained of the same targets (``hepo/group_ev``).
    At GPU scale the critic explained -0.04 to 0.16 while the group mean explained 0.08-0.66
    (benchmarks/RESULTS.md), so ``positive`` switches to a baseline worse than the one it replaces"""

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
        if self.gae_gate not in GAE_GATES:
            raise ValueError(f"gae_gate={self.gae_gate!r} is unknown: expected one of {list(GAE_GATES)}")
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


def forced_levels(legal: list[Tensor]) -> Tensor:
    """L masks (..., K_l) of the legal codes -> (..., L) bool: the level offered at most one code.

    Such a level is not a decision (its log-prob is 0 with no gradient), whatever the tokenizer: the
    disambiguation digit of an item that shares its semantic path with no other, or a trie node with one
    child (module doc).
    """
    return torch.stack([_at_most_one(m) for m in legal], -1)


def _at_most_one(mask: Tensor, cells: int = 1 << 26) -> Tensor:
    """(..., K) bool -> (...) bool: at most one True, counted in chunks of ``cells`` mask entries. ``sum`` of a
    bool tensor counts in int64, a copy 8x the mask: one gpu-large iteration's last level asked for 28 GiB."""
    flat = mask.reshape(-1, mask.shape[-1])
    rows = max(1, cells // max(flat.shape[1], 1))
    return torch.cat([part.sum(-1) <= 1 for part in flat.split(rows)]).reshape(mask.shape[:-1])


def terminal_level(free: Tensor) -> Tensor:
    """(..., L) bool non-forced levels -> (..., L) bool, True at the last non-forced level of each path
    (where HEPO's terminal reward and group z-score land); all False for a path with none."""
    rank = free.cumsum(-1)
    return free & (rank == rank[..., -1:])


def semantic_level_weights(free: Tensor, kind: str = "linear") -> Tensor:
    """(..., L) bool non-forced levels -> (..., L) c_l per path over its n non-forced levels only.

    ``linear``: the i-th non-forced level gets i / n (so the terminal level gets 1), ``uniform``: 1 / n;
    forced levels get 0, and a path with no non-forced level gets 0 everywhere. With every level free this
    is ``level_weights(L, kind)``.
    """
    if kind not in ("linear", "uniform"):
        raise ValueError(f"level weights {kind!r} are unknown: expected linear | uniform")
    n = free.sum(-1, keepdim=True).clamp_min(1)  # (..., 1)
    w = free.cumsum(-1) / n if kind == "linear" else (1.0 / n).expand(free.shape)
    return torch.where(free, w, torch.zeros_like(w)).float()


def group_zscore(reward: Tensor, eps: float = 1e-4) -> Tensor:
    """(B, K) -> (B, K) (R - mean_K) / (std_K + eps), population std over the group."""
    mean = reward.mean(-1, keepdim=True)
    std = reward.std(-1, unbiased=False, keepdim=True)
    return (reward - mean) / (std + eps)


def gae(
    rewards: Tensor, values: Tensor, gamma: float, lam: float, free: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GAE over the decisions of a path, which ends after its last one (terminal value 0).

    Args:
        rewards: (M, L) r_l received after choosing z_l.
        values: (M, L) V(s, z_<l): the critic in the state where z_l is chosen.
        free: (M, L) bool, the levels that are decisions (None: all). A forced level is skipped: it gets
            advantage 0, and the step before it bootstraps from the next decision's state (the forced code
            moves the path there deterministically) with one discount per decision, not per level.

    Returns:
        advantages (M, L) and returns G_l = A_l + V(s, z_<l) (M, L) (= V at a forced level).
    """
    m, length = rewards.shape
    running = rewards.new_zeros(m)
    next_value = rewards.new_zeros(m)  # V of the next decision's state; 0 after the last
    adv = torch.zeros_like(rewards)
    for level in reversed(range(length)):  # L is 2-4: a loop over levels, not rows
        delta = rewards[:, level] + gamma * next_value - values[:, level]
        step = delta + gamma * lam * running
        if free is None:
            running, next_value = step, values[:, level]
        else:
            f = free[:, level]
            running = torch.where(f, step, running)
            next_value = torch.where(f, values[:, level], next_value)
            step = torch.where(f, step, torch.zeros_like(step))
        adv[:, level] = step
    return adv, adv + values


def explained_variance(target: Tensor, pred: Tensor, dist: Dist = SINGLE) -> float:
    """1 - Var(target - pred) / Var(target) over the elements of every rank (population variances).

    1 = the prediction explains the target; 0 = no better than its mean; negative = worse. A constant
    (or empty) target has nothing to explain: 0.
    """
    t, e = target.double().flatten(), (target - pred).double().flatten()
    moments = torch.stack(
        [t.new_tensor(float(t.numel())), t.sum(), t.square().sum(), e.sum(), e.square().sum()]
    )
    n, st, st2, se, se2 = all_reduce_sum(moments, dist).tolist()
    if n == 0:
        return 0.0
    var_t, var_e = st2 / n - (st / n) ** 2, se2 / n - (se / n) ** 2
    if var_t <= 1e-12 * (st2 / n):  # constant up to rounding
        return 0.0
    return 1.0 - var_e / var_t


def process_rewards(codes: Tensor, legal: list[Tensor], positives: Tensor, scale: float) -> Tensor:
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


def level_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, weights: Tensor, clip: float
) -> Tensor:
    """Per-level PPO policy loss -sum_l c_l mean_M PPO-clip(rho_l, A_l) (HEPO's objective, GPR §4.3).

    Args:
        log_prob, old_log_prob, adv: (M, L) per level.
        weights: (L,) c_l, or (M, L) c_l per path (``semantic_level_weights``): -mean_M sum_l c_ml PPO-clip.

    Returns:
        the loss (to minimise), a scalar.
    """
    surr = clipped_surrogate(log_prob, old_log_prob, adv, clip)  # (M, L)
    if weights.dim() == 2:
        return -(weights.to(surr) * surr).sum(-1).mean()
    return -(weights.to(surr) * surr.mean(0)).sum()


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
Monitor = Callable[[Tensor, Tensor | None, Buffer, LossConfig], dict[str, Tensor]]
"""(log_prob (M, K, L), reference log_prob or None, minibatch, constants) -> named scalar tensors: what the
algorithm's own loss needs watched (computed without gradients, logged as ``train/NAME``, averaged over minibatches)"""


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
    monitor: Monitor | None = None
    """per-minibatch diagnostics of its loss (e.g. DPO's log-ratios to the reference), or None"""

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"name={self.name!r} is invalid: expected an identifier (the --algo value)")
        for field in ("targets", "loss"):
            if not callable(getattr(self, field)):
                raise ValueError(f"{self.name}: {field} is invalid: expected a function")
        if self.monitor is not None and not callable(self.monitor):
            raise ValueError(f"{self.name}: monitor is invalid: expected a function or None")


__all__ = [
    "Algorithm",
    "LossConfig",
    "level_weights",
    "forced_levels",
    "terminal_level",
    "semantic_level_weights",
    "group_zscore",
    "gae",
    "explained_variance",
    "process_rewards",
    "clipped_surrogate",
    "level_surrogate",
    "item_value_loss",
    "kl_to_reference",
]
