"""The rollout buffer: one iteration's requests and their K sampled paths, and its row operations.

``agents.rl.rollout.Roller`` fills it; the algorithm's ``targets`` (``agents.rl.common.Algorithm``) add
the advantages and returns; the training loop (``agents.rl.loop``) cuts it into minibatches of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from agents.rl.distributed import SINGLE, Dist
from gpr_sim.schema import TokenBatch


def cat_tokens(parts: list[TokenBatch]) -> TokenBatch:
    """Token batches concatenated along the request dimension."""
    return TokenBatch(*(torch.cat(fields) for fields in zip(*parts)))


@dataclass
class Buffer:
    """One iteration's requests, flat over (steps x sessions, then rehearsed); K paths each.

    The ``old_*`` fields are from the rollout policy; ``adv``/``returns`` are the algorithm's ``targets``.
    Data-parallel, a buffer holds this rank's rows of the global batch: ``dist`` is the job whose ranks
    hold the rest, for the statistics a ``targets`` takes over the whole batch (``agents.rl.hepo``).
    """

    tokens: TokenBatch  # M requests
    noise: Tensor | None  # (M, C) refiner start noise
    codes: Tensor  # (M, K, L)
    old_log_prob: Tensor  # (M, K, L)
    legal: list[Tensor]  # L of (M, K, K_l)
    old_values: Tensor  # (M, K, L + 1): V(s, z_<l) for l = 0..L-1, then the full item
    reward: Tensor  # (M, K) scaled R
    process: Tensor  # (M, K, L) process rewards (0 at level L)
    valid: Tensor  # (M,) bool: the request had an eligible ad
    rehearsed: Tensor  # (M,) bool: an ARR request
    adv: Tensor | None = None  # (M, K, L) or (M, K)
    returns: Tensor | None = None  # (M, K, L) HEPO critic targets (PPO regresses on ``reward``)
    uid: Tensor | None = None  # (M,) int64 request id unique over all ranks (``Roller.request_ids``)
    blind_reward: Tensor | None = (
        None  # (M, K) scaled R before the budget share (None: ``reward``, no budgets)
    )
    dist: Dist = SINGLE  # the data-parallel job holding the rest of the global batch
    learner_state: dict | None = None  # ``Roller.learner_state`` (the same dict): what targets carry over
    stats: dict | None = (
        None  # per-iteration metrics a ``targets`` adds (``hepo/*``), logged with the rollout's
    )

    def __len__(self) -> int:
        return self.codes.shape[0]

    def rows(self, idx: Tensor) -> Buffer:
        def take(t):
            return None if t is None else t[idx]

        return Buffer(
            TokenBatch(*(t[idx] for t in self.tokens)),
            take(self.noise),
            self.codes[idx],
            self.old_log_prob[idx],
            [m[idx] for m in self.legal],
            self.old_values[idx],
            self.reward[idx],
            self.process[idx],
            self.valid[idx],
            self.rehearsed[idx],
            take(self.adv),
            take(self.returns),
            take(self.uid),
            take(self.blind_reward),
            self.dist,
            self.learner_state,
            self.stats,
        )

    @staticmethod
    def concat(parts: list[Buffer]) -> Buffer:
        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)

        fields = list(
            zip(
                *[
                    (
                        p.tokens,
                        p.noise,
                        p.codes,
                        p.old_log_prob,
                        p.legal,
                        p.old_values,
                        p.reward,
                        p.process,
                        p.valid,
                        p.rehearsed,
                        p.adv,
                        p.returns,
                        p.uid,
                        p.blind_reward,
                    )
                    for p in parts
                ]
            )
        )
        legal = [torch.cat(level) for level in zip(*fields[4])]
        first = parts[0]  # the job and the learner's state are the same for every part
        return Buffer(
            cat_tokens(list(fields[0])),
            cat(fields[1]),
            cat(fields[2]),
            cat(fields[3]),
            legal,
            *(cat(f) for f in fields[5:]),
            first.dist,
            first.learner_state,
            first.stats,
        )


__all__ = ["Buffer", "cat_tokens"]
