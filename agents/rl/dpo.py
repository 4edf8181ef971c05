"""DPO: in each group, the best path is preferred to the worst, against the frozen reference generator.

No targets (pairs are formed in the loss from the rewards). Loss:
-mean log sigmoid(beta [(log pi(w) - log ref(w)) - (log pi(l) - log ref(l))]) over the groups whose best
and worst rewards differ, path log-probs summed over levels.
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


def loss(log_prob: Tensor, values: Tensor, ref_log_prob: Tensor | None, buf: Buffer, cfg: LossConfig):
    """``dpo_loss`` on the best vs worst path of each group that has a difference -> (policy, no critic)."""
    if ref_log_prob is None:
        raise ValueError("dpo needs the reference policy's log-probs (Algorithm.reference)")
    m = buf.codes.shape[0]
    best, worst = buf.reward.argmax(1), buf.reward.argmin(1)
    rows = torch.arange(m, device=log_prob.device)
    has = buf.reward[rows, best] > buf.reward[rows, worst]
    lp, rl = log_prob.sum(-1), ref_log_prob.sum(-1)  # (M, K)
    policy = (
        dpo_loss(
            lp[rows, best][has], lp[rows, worst][has], rl[rows, best][has], rl[rows, worst][has], cfg.dpo_beta
        )
        if bool(has.any())
        else log_prob.sum() * 0
    )
    return policy, None


DPO = Algorithm("dpo", targets, loss, reference=True)

__all__ = ["DPO", "dpo_loss", "loss", "targets"]
