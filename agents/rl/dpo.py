"""DPO: in each group, the best path is preferred to the worst, against the frozen reference generator.

No targets (pairs are formed in the loss from the rewards). Loss:
-mean log sigmoid(beta [(log pi(w) - log ref(w)) - (log pi(l) - log ref(l))]) over the groups whose best
and worst rewards differ, path log-probs summed over levels.

Watched (``monitor``, as ``train/dpo_*``): the pairs' log-ratios to the reference, chosen and rejected, their
share of groups, and how often the chosen path's log-ratio is the larger (TRL's rewards/chosen, /rejected,
/accuracies up to beta). DPO only asks the chosen ratio to exceed the rejected one: unanchored, the probability both
lose can go to paths neither chosen nor rejected (likelihood displacement, Pal et al. 2024, Razin et al. 2024), here
ads below the auction's reserve, and the served policy stops filling slots. The pairs are the policy's own samples,
so their ratios measure how far it has moved, not where the mass went (``benchmarks/path_mass_shift.py`` does):
unanchored, both ratios climbed to about +3 nats and the accuracy fell to 0.18 within 7 iterations of the CPU demo
config; with ``--loss.kl-coef 1`` they stayed near +1 and -0.3 at 0.96-0.99 accuracy (RESULTS "DPO's collapse is
likelihood displacement").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.rl.buffer import Buffer
from agents.rl.common import Algorithm, LossConfig


def targets(buf: Buffer, cfg: LossConfig) -> tuple[None, None]:
    """Nothing: the preference pairs are formed in the loss."""
    return None, None


def dpo_loss(log_prob_w: Tensor, log_prob_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """DPO: -log sigmoid(beta [(log pi(w) - log ref(w)) - (log pi(l) - log ref(l))]), paths summed over levels."""
    margin = (log_prob_w - ref_w) - (log_prob_l - ref_l)
    return -F.logsigmoid(beta * margin).mean()


def pairs(reward: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(M, K) rewards -> (rows, best, worst, has): each group's best and worst path (the first of ties) and whether
    they differ (a group whose paths all earned the same has no preference)."""
    rows = torch.arange(reward.shape[0], device=reward.device)
    best, worst = reward.argmax(1), reward.argmin(1)
    return rows, best, worst, reward[rows, best] > reward[rows, worst]


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``dpo_loss`` on the best vs worst path of each group that has a difference -> (policy, no critic)."""
    if ref_log_prob is None:
        raise ValueError("dpo needs the reference policy's log-probs (Algorithm.reference)")
    rows, best, worst, has = pairs(buf.reward)
    lp, rl = log_prob.sum(-1), ref_log_prob.sum(-1)  # (M, K)
    policy = (
        dpo_loss(
            lp[rows, best][has], lp[rows, worst][has], rl[rows, best][has], rl[rows, worst][has], cfg.dpo_beta
        )
        if bool(has.any())
        else log_prob.sum() * 0
    )
    return policy, None


def monitor(log_prob: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig) -> dict[str, Tensor]:
    """The minibatch's pairs (module doc): mean log pi - log ref of the chosen and of the rejected paths (summed over
    levels), the share of groups with a pair, and the share of pairs whose chosen log-ratio is the larger; 0 where
    the minibatch has no pair (a finite number, as every logged term must be)."""
    rows, best, worst, has = pairs(buf.reward)
    ratio = (log_prob - ref_log_prob).sum(-1)  # (M, K)
    chosen, rejected = ratio[rows, best][has], ratio[rows, worst][has]
    n = has.sum().clamp_min(1).to(ratio.dtype)
    return {
        "dpo_chosen_logratio": chosen.sum() / n,
        "dpo_rejected_logratio": rejected.sum() / n,
        "dpo_pairs": has.to(ratio.dtype).mean() if has.numel() else ratio.new_zeros(()),
        "dpo_accuracy": (chosen > rejected).to(ratio.dtype).sum() / n,
    }


DPO = Algorithm("dpo", targets, loss, reference=True, monitor=monitor)

__all__ = ["DPO", "dpo_loss", "loss", "monitor", "pairs", "targets"]
