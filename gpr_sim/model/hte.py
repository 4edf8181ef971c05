"""HTE: the evaluator of GPR §3, predicting ``final_value`` for every prefix z_1..z_l and the full item.

V(s, z_<=l) for l = 0..L' comes from one MLP over ``pooled context + sum_{j<=l} emb_j(z_j) + level_l``:
the cumulative sum makes value l depend on the first l codes only, so one call scores every level of a
path (critic targets for HEPO's GAE) and a beam search can score each partial prefix as it grows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpr_sim.model.config import GPRConfig
from gpr_sim.model.hsd import MLP


class HTE(nn.Module):
    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.path_len = cfg.path_len
        self.pool = nn.Linear(d, d)
        self.code_emb = nn.ModuleList(nn.Embedding(k, d) for k in cfg.level_sizes)
        self.level_emb = nn.Embedding(cfg.path_len + 1, d)  # depth 0 (no code yet) .. L'
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.ffn_mult * d)
        self.head = nn.Linear(d, 1)

    def forward(self, context: Tensor, prefix_codes: Tensor) -> Tensor:
        """Values of every prefix.

        Args:
            context: (B, Cc, C) PTD context.
            prefix_codes: (B, l) int64 codes, 0 <= l <= L' (l = L' for a full item).

        Returns:
            (B, l + 1) predicted final_value of z_<=0 (the request alone), z_<=1, ..., z_<=l.
        """
        b, depth = prefix_codes.shape
        if depth > self.path_len:
            raise ValueError(f"prefix_codes has {depth} levels: expected at most L'={self.path_len}")
        base = self.pool(context.mean(1))  # (B, C)
        steps = [torch.zeros_like(base)] + [self.code_emb[i](prefix_codes[:, i]) for i in range(depth)]
        x = (
            torch.stack(steps, 1).cumsum(1) + base[:, None] + self.level_emb.weight[: depth + 1]
        )  # (B, l + 1, C)
        x = x + self.mlp(self.ln(x))
        return self.head(x).squeeze(-1)  # (B, l + 1)
