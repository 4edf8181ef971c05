"""HEPO (GPR §4.3): PPO per level of the semantic-ID path, with the HTE as critic.

**Decisions.** A level is an action only where the path had a choice: a level whose legal mask holds one
code for that path (``forced_levels``: the tokenizer's disambiguation digit of an item that shares its
semantic path with no other, a trie node with one child) has log-prob 0 and no gradient. Such a level
gets advantage 0, weight 0 and no critic term; c_l runs over the path's n non-forced levels
(``semantic_level_weights``, linear: i / n); the path's terminal level t is its last non-forced one
(``terminal_level``), where R and the group z-score land. A path with no non-forced level (its request
left it no choice anywhere) has no decision: zeros throughout, no gradient, and it is left out of the
statistics.

**Rewards.** r_l = a x max(0, D_l) (the popularity process reward, ``process_rewards``) at the coarse
levels (non-forced, before t), R at t. a is set per rollout so that the process term's mean absolute
value is ``process_scale`` x the mean absolute terminal advantage (``LossConfig.process_scale``).

**Critic: a budget-blind, stationary target.** The rollout's R is budget-aware: R = s x R0, R0 the
candidate's value for the request and s its advertiser's budget share this step (remaining budget over
the expected charge of the ads every session is served now, ``agents.rl.rollout``). s is fixed by the
draws of every session of the step, after the prefix values were computed, and the HTE sees the request
and the prefix only, so regressed on R it explained none of R. It regresses the budget-blind returns
G^0 (GAE of the process rewards and R0, ``Buffer.blind_reward``) instead, a function of what it sees,
and the share comes back where it is known at rollout time, in the reward: the advantages are GAE of the
process rewards and s x R0 against the blind values (terminal delta s R0 - V(s, z_<t)). Rejected:
- the share as an HTE input: a prefix has no single advertiser (s belongs to the candidate, an action
  still to be taken below the prefix), so a value that reads it is an action-dependent baseline (biased);
  s exists only once every session's group is sampled and scored; and the HTE also ranks beams at
  serving time, where there is no share;
- the blind advantage times s, s (R0 - V): its baseline s V depends on the action and the budget signal
  vanishes: ads of equal R0 = V with s = 1 and s = 0.1 both get advantage 0, where R prefers the first.
V is a state-only baseline for R, so the terminal term stays unbiased; with lambda < 1 the coarse levels
see budgets through the (gamma lambda)^k-discounted terminal delta.

**GAE or the group baseline.** GAE against a critic that explains nothing is noise. ``hepo/critic_ev`` =
1 - Var(G^0 - V) / Var(G^0) over the targets at each path's first decision (``explained_variance``).
While the previous rollout's EV is not positive (and before any; with ``LossConfig.gae_gate`` "group", while it
is not above what the group's mean return explained of the same targets, ``hepo/group_ev``), the advantages fall
back to the group baseline: A_l = z_K(R) plus the discounted process rewards still to come, at every decision
(GRPO's baseline, ``hepo/gae_used`` 0). The previous EV lives in ``Buffer.learner_state`` (the Roller's dict, in
its checkpoint), so a resumed run decides as the uninterrupted one. With ``group_norm`` A_t = z_K(R) in
either case; without it, A_t is GAE's (z_K(R) while falling back).

Loss: -mean_M sum_l c_l PPO-clip(rho_l, A_l) plus the critic sum_l mean_M (V(s_l) - G^0_l)^2 over the
decisions.

Statistics (``Buffer.stats``, logged each iteration, over the valid requests of every rank): ``hepo/``
critic_ev, group_ev (the same for the group's mean G^0 as the prediction: the bar a critic has to clear
to beat the group baseline), gae_used, process_share (mean |a max(0, D_l)| / mean |A_t|), process_coef
(a); per level
l = 1..L: level{l}_adv_mean and level{l}_adv_std over the decisions at that level (NaN without any),
level{l}_forced_frac, level{l}_weight (the mean c_l, forced levels counted as 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import (
    Algorithm,
    LossConfig,
    explained_variance,
    forced_levels,
    gae,
    group_zscore,
    level_surrogate,
    semantic_level_weights,
    terminal_level,
)
from agents.rl.distributed import all_reduce_sum

EV_KEY = "critic_ev"
"""``Buffer.learner_state`` key of the last rollout's critic explained variance"""
GROUP_EV_KEY = "group_ev"
"""``Buffer.learner_state`` key of what the last rollout's group means explained of the same targets"""


def process_coef(
    process: Tensor, coarse: Tensor, terminal_adv: Tensor, paths: Tensor, buf: Buffer, cfg: LossConfig
) -> tuple[float, float]:
    """a of the process term a max(0, D_l) (``LossConfig.process_scale``) and the share it gives.

    Args:
        process: (M, K, L) max(0, D_l) (``Buffer.process``).
        coarse: (M, K, L) bool, the coarse decisions of valid requests' paths.
        terminal_adv: (M, K) A_t.
        paths: (M, K) bool, valid requests' paths with a decision.

    Returns:
        (a, measured mean |a max(0, D_l)| / mean |A_t|) over every rank's rows; (0, 0) when the process
        rewards are off or none is positive.
    """
    sums = torch.stack(
        [paths.sum(), (terminal_adv.abs() * paths).sum(), coarse.sum(), (process.abs() * coarse).sum()]
    )
    n_t, abs_t, n_c, abs_d = all_reduce_sum(sums.double(), buf.dist).tolist()
    mean_t, mean_d = abs_t / max(n_t, 1.0), abs_d / max(n_c, 1.0)
    if not (cfg.process_rewards and mean_d > 0 and mean_t > 0):
        return 0.0, 0.0
    a = cfg.process_scale * mean_t / mean_d
    return a, a * mean_d / mean_t


def level_stats(adv: Tensor, free: Tensor, weights: Tensor, valid: Tensor, buf: Buffer) -> dict[str, float]:
    """``hepo/level{l}_*`` over the valid requests' paths of every rank (module doc).

    Args:
        adv, weights: (M, K, L) float; free: (M, K, L) bool decisions; valid: (M, K) bool.
    """
    dec = (free & valid[..., None]).double()  # (M, K, L)
    a, paths = adv.double(), valid.double()[..., None]
    rows = [dec, dec * a, dec * a.square(), paths * (1.0 - free.double()), paths * weights.double()]
    sums = torch.stack([r.sum((0, 1)) for r in rows] + [paths.sum().expand(adv.shape[-1])])  # (6, L)
    n, s1, s2, forced, weight, n_paths = all_reduce_sum(sums, buf.dist).tolist()
    out: dict[str, float] = {}
    for lvl in range(adv.shape[-1]):
        mean = s1[lvl] / n[lvl] if n[lvl] else math.nan
        var = max(s2[lvl] / n[lvl] - mean * mean, 0.0) if n[lvl] else math.nan
        paths_l = max(n_paths[lvl], 1.0)
        out[f"hepo/level{lvl + 1}_adv_mean"] = mean
        out[f"hepo/level{lvl + 1}_adv_std"] = math.sqrt(var)
        out[f"hepo/level{lvl + 1}_forced_frac"] = forced[lvl] / paths_l
        out[f"hepo/level{lvl + 1}_weight"] = weight[lvl] / paths_l
    return out


def targets(buf: Buffer, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """(adv, returns), both (M, K, L): advantages on the decisions, budget-blind critic targets (module doc).

    Reads the previous rollout's critic EV from ``buf.learner_state`` and stores this one's there (none
    kept when the buffer has no state: GAE is then off); sets ``buf.stats``.
    """
    m, k, length = buf.codes.shape
    free = ~forced_levels(buf.legal)  # (M, K, L) the decisions
    last = terminal_level(free)  # (M, K, L) t, the last decision
    coarse = free & ~last
    valid = buf.valid[:, None].expand(m, k)  # (M, K)
    paths = valid & last.any(-1)  # (M, K) paths that had a decision
    values = buf.old_values[..., :length]  # (M, K, L) V(s, z_<l), budget-blind
    blind = buf.reward if buf.blind_reward is None else buf.blind_reward  # (M, K)
    z = group_zscore(buf.reward, cfg.adv_eps)  # (M, K)
    state = {} if buf.learner_state is None else buf.learner_state
    # the previous rollout's critic explained something (and, gae_gate "group", more than the group mean did)
    use_gae = state.get(EV_KEY, math.nan) > (
        0.0 if cfg.gae_gate == "positive" else max(0.0, state.get(GROUP_EV_KEY, math.inf))
    )

    v_t = (values * last).sum(-1)  # (M, K) V(s, z_<t)
    terminal_adv = z if (cfg.group_norm or not use_gae) else buf.reward - v_t  # A_t (no process reward at t)
    a, share = process_coef(buf.process, coarse & valid[..., None], terminal_adv, paths, buf, cfg)
    proc = a * buf.process * coarse  # (M, K, L) r_l at the coarse decisions

    def run(terminal: Tensor, vals: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        rewards = proc + terminal[..., None] * last  # (M, K, L)
        adv, ret = gae(rewards.flatten(0, 1), vals.flatten(0, 1), cfg.gamma, lam, free.flatten(0, 1))
        return adv.view(m, k, length), ret.view(m, k, length)

    _, returns = run(blind, values, cfg.lam)  # G^0: the critic's stationary targets
    if use_gae:
        adv, _ = run(buf.reward, values, cfg.lam)  # the share back in the reward, blind V as baseline
    else:  # group baseline: z_K(R) plus the process rewards still to come (lambda 1, no critic)
        to_go, _ = run(torch.zeros_like(z), torch.zeros_like(values), 1.0)
        adv = to_go + z[..., None] * free
    if cfg.group_norm:
        adv = torch.where(last, z[..., None].expand_as(adv), adv)

    first = free & (free.cumsum(-1) == 1) & valid[..., None]  # (M, K, L) each path's first decision
    ev = explained_variance(returns[first], values[first], buf.dist)
    state[EV_KEY] = ev
    # what the group baseline explains of the same targets (the group's mean G, own path included)
    g1 = (returns * first).sum(-1)  # (M, K) G^0 at the first decision
    has = first.any(-1)  # (M, K)
    group_mean = (g1 * has).sum(-1, keepdim=True) / has.sum(-1, keepdim=True).clamp_min(1)  # (M, 1)
    group_ev = explained_variance(g1[has], group_mean.expand_as(g1)[has], buf.dist)
    state[GROUP_EV_KEY] = group_ev
    weights = semantic_level_weights(free, cfg.level_weights)
    buf.stats = {
        "hepo/critic_ev": ev,
        "hepo/group_ev": group_ev,
        "hepo/gae_used": int(use_gae),
        "hepo/process_share": share,
        "hepo/process_coef": a,
        **level_stats(adv, free, weights, valid, buf),
    }
    return adv, returns


def hepo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    adv: Tensor,
    values: Tensor,
    returns: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    free: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """HEPO: -mean sum_l c_l PPO-clip(rho_l, A_l) and the critic loss sum_l mean (V(s_l) - G_l)^2.

    Args:
        log_prob, old_log_prob, adv: (M, L) per level.
        values: (M, L) current V(s, z_<l); returns: (M, L) G_l from the rollout.
        weights: (L,) c_l, or (M, L) per path (0 at forced levels).
        free: (M, L) bool decisions, the only levels the critic is fitted at (None: every level).

    Returns:
        (policy loss, critic loss), scalars.
    """
    policy = level_surrogate(log_prob, old_log_prob, adv, weights, cfg.clip)
    err = (values - returns).pow(2)
    if free is not None:
        err = err * free
    return policy, err.mean(0).sum()


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``hepo_loss`` on a minibatch: log_prob (M, K, L), values (M, K, L + 1) -> (policy, critic)."""
    length = buf.codes.shape[-1]
    free = ~forced_levels(buf.legal)  # (M, K, L)
    w = semantic_level_weights(free, cfg.level_weights).to(log_prob.device)
    return hepo_loss(
        log_prob.flatten(0, 1),
        buf.old_log_prob.flatten(0, 1),
        buf.adv.flatten(0, 1),
        values[..., :length].flatten(0, 1),
        buf.returns.flatten(0, 1),
        w.flatten(0, 1),
        cfg,
        free.flatten(0, 1),
    )


HEPO = Algorithm("hepo", targets, loss, critic=True)

__all__ = ["EV_KEY", "HEPO", "hepo_loss", "level_stats", "loss", "process_coef", "targets"]
