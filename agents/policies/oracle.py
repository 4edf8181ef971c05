"""``oracle`` and ``oracle-fatigue``: labelled references that read the hidden state.

``OraclePolicy`` ranks every eligible ad by its *true* expected immediate reward (a myopic upper
bound); with ``fatigue_penalty > 0`` it also charges each ad the fatigue it would cause (the simple
fatigue-aware variant used to show that long-term value is real).
"""

from __future__ import annotations

import torch

from agents.policies import PolicyOutput, batched_env, catalog_rows, row_chunks
from gpr_sim.world.config import check_range


class OraclePolicy:
    """Top-K eligible ads by true expected immediate reward, optionally minus a fatigue charge.

    ``fatigue_penalty`` charges each ad ``penalty x P(win) x (fatigue it adds)``: the fatigue-aware
    variant trades a little value now for a user who stays longer.
    """

    def __init__(self, env, fatigue_penalty: float = 0.0, chunk_size: int = 2048):
        check_range("fatigue_penalty", fatigue_penalty, 0.0, 1e6)
        self.env = batched_env(env)
        self.fatigue_penalty = fatigue_penalty
        self.chunk_size = chunk_size

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        world = self.env.world
        wc = world.config
        k = wc.num_candidates
        eligible = self.env.eligible_ads()
        n = obs["user_id"].shape[0]
        device = self.env.device
        action = torch.empty(n, k, dtype=torch.int64, device=device)
        all_ads = torch.arange(wc.num_ads, device=device)
        state = self.env.state
        for sl in row_chunks(n, catalog_rows(self.chunk_size, wc.num_ads)):
            rows = torch.arange(n, device=device)[sl]
            sub = state.select(rows)
            cand = all_ads[None].expand(rows.numel(), -1)
            sc = self.env.score(cand, truth=True, state=sub)  # the scoring API on this chunk of rows
            v = sc.value
            if self.fatigue_penalty > 0:
                match = sub.interest @ world.ad_emb.T
                added = wc.fatigue_per_ad + wc.fatigue_irrelevance * (1.0 - match).clamp(min=0.0)
                v = v - self.fatigue_penalty * sc.p_win * added
            action[sl] = v.masked_fill(~eligible[None], float("-inf")).topk(k, dim=1).indices
        return PolicyOutput(action, torch.ones(n, dtype=torch.float64, device=device))


FATIGUE_AWARE_PENALTY = 0.1
"""Default fatigue charge of the ``oracle-fatigue`` variant (currency per unit of fatigue)."""
