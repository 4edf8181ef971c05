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
        return self.forward_paths(context, prefix_codes[:, None])[:, 0]

    def forward_paths(self, context: Tensor, paths: Tensor) -> Tensor:
        """Values of every prefix of K paths per request: ``forward(context[b], paths[b, k])`` for all (b, k).

        Args:
            context: (B, Cc, C) PTD context, once per request.
            paths: (B, K, l) int64 codes, 0 <= l <= L'.

        Returns:
            (B, K, l + 1). The pooled context and the request-only value (l = 0) are computed once per
            request, not once per path: no (B K, Cc, C) copy of the context, 1 + K l MLP rows, not K (l + 1).
        """
        b, k, depth = paths.shape
        if depth > self.path_len:
            raise ValueError(f"prefix_codes has {depth} levels: expected at most L'={self.path_len}")
        base = self.pool(context.mean(1))  # (B, C)
        root = (base + self.level_emb.weight[0])[:, None]  # (B, 1, C): the empty prefix, shared by the paths
        if depth == 0:
            return self._value(root).expand(b, k)[..., None]
        steps = torch.stack([self.code_emb[i](paths[..., i]) for i in range(depth)], 2)  # (B, K, l, C)
        x = steps.cumsum(2) + base[:, None, None] + self.level_emb.weight[1 : depth + 1]  # (B, K, l, C)
        v = self._value(torch.cat([root, x.flatten(1, 2)], 1))  # (B, 1 + K l)
        return torch.cat([v[:, :1, None].expand(b, k, 1), v[:, 1:].view(b, k, depth)], 2)  # (B, K, l + 1)

    def _value(self, x: Tensor) -> Tensor:
        """(..., C) prefix features -> (...) value."""
        return self.head(x + self.mlp(self.ln(x))).squeeze(-1)
