"""HTE: the evaluator of GPR §3, predicting ``final_value`` for every prefix z_1..z_l and the full item.

V(s, z_<=l) for l = 0..L' comes from one MLP over ``pooled context + sum_{j<=l} emb_j(z_j) + level_l``:
the cumulative sum makes value l depend on the first l codes only, so one call scores every level of a
path (critic targets for HEPO's GAE) and a beam search can score each partial prefix as it grows.

Candidate features (``GPRConfig.hte_ad_features`` = F_ad > 0): a full path (all L' levels) names one ad,
and the platform knows that ad's bid, order value, age and budget (``gpr_sim.platform.features``). GPR's
final_value factors eCPM = bid x pCTR x pCVR, so the full-item value must be able to read the bid: the
depth-L' representation gets ``ad_proj(features)`` added, a bias-free Linear(F_ad, d) that starts at zero
(a model with the input on but untrained scores exactly as one without it, and zero features, those of an
organic or unknown path, add nothing). Shorter prefixes name no single ad and are unchanged.
``path_ad_features`` is the one lookup from paths to those features that every caller uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from gpr_sim.model.config import GPRConfig
from gpr_sim.model.hsd import MLP

if TYPE_CHECKING:
    from gpr_sim.platform.features import PlatformFeatures
    from gpr_sim.tokenizer.world import WorldTokenizer


def path_ad_features(
    tokenizer: WorldTokenizer, features: PlatformFeatures | None, paths: Tensor
) -> Tensor | None:
    """Platform features of the ad each full path decodes to: the HTE's candidate input.

    Args:
        tokenizer: the world's tokenizer (``WorldTokenizer.ads_of``: path -> ad through its item table).
        features: the platform's per-ad features, on the paths' device; None = the model reads none.
        paths: (..., L') int64 full paths (-1 rows, organic and unknown paths allowed).

    Returns:
        (..., F_ad) float32 rows of ``features.ad_features``, zeros where the path is no ad; None when
        ``features`` is None.
    """
    if features is None:
        return None
    return features.of_ads(tokenizer.ads_of(paths))


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
        self.ad_proj = None
        if cfg.hte_ad_features > 0:
            # zero-init and no bias: untrained (or fed zeros) it adds nothing (module doc)
            self.ad_proj = nn.Linear(cfg.hte_ad_features, d, bias=False)
            nn.init.zeros_(self.ad_proj.weight)

    def forward(self, context: Tensor, prefix_codes: Tensor, ad_features: Tensor | None = None) -> Tensor:
        """Values of every prefix.

        Args:
            context: (B, Cc, C) PTD context.
            prefix_codes: (B, l) int64 codes, 0 <= l <= L' (l = L' for a full item).
            ad_features: optional (B, F_ad) features of the ad each full path names (``path_ad_features``);
                only with ``hte_ad_features`` and l = L'. None = zeros.

        Returns:
            (B, l + 1) predicted final_value of z_<=0 (the request alone), z_<=1, ..., z_<=l.
        """
        feats = None if ad_features is None else ad_features[:, None]
        return self.forward_paths(context, prefix_codes[:, None], feats)[:, 0]

    def forward_paths(self, context: Tensor, paths: Tensor, ad_features: Tensor | None = None) -> Tensor:
        """Values of every prefix of K paths per request: ``forward(context[b], paths[b, k])`` for all (b, k).

        Args:
            context: (B, Cc, C) PTD context, once per request.
            paths: (B, K, l) int64 codes, 0 <= l <= L'.
            ad_features: optional (B, K, F_ad) features of the ad each full path names
                (``path_ad_features``); only with ``hte_ad_features`` and l = L'. None = zeros.

        Returns:
            (B, K, l + 1). The pooled context and the request-only value (l = 0) are computed once per
            request, not once per path: no (B K, Cc, C) copy of the context, 1 + K l MLP rows, not K (l + 1).
        """
        b, k, depth = paths.shape
        if depth > self.path_len:
            raise ValueError(f"prefix_codes has {depth} levels: expected at most L'={self.path_len}")
        if ad_features is not None:
            if self.ad_proj is None:
                raise ValueError("ad_features given but GPRConfig.hte_ad_features is 0: the HTE reads none")
            want = (b, k, self.ad_proj.in_features)
            if tuple(ad_features.shape) != want or depth != self.path_len:
                raise ValueError(
                    f"ad_features must be {want} with full paths (l = L'={self.path_len}), got "
                    f"{tuple(ad_features.shape)} with l = {depth}"
                )
        base = self.pool(context.mean(1))  # (B, C)
        root = (base + self.level_emb.weight[0])[:, None]  # (B, 1, C): the empty prefix, shared by the paths
        if depth == 0:
            return self._value(root).expand(b, k)[..., None]
        steps = torch.stack([self.code_emb[i](paths[..., i]) for i in range(depth)], 2)  # (B, K, l, C)
        x = steps.cumsum(2) + base[:, None, None] + self.level_emb.weight[1 : depth + 1]  # (B, K, l, C)
        if ad_features is not None:  # the candidate ad's features join the full item's representation
            last = x[:, :, -1] + self.ad_proj(ad_features.to(x.dtype))  # (B, K, C)
            x = torch.cat([x[:, :, :-1], last[:, :, None]], 2)
        v = self._value(torch.cat([root, x.flatten(1, 2)], 1))  # (B, 1 + K l)
        return torch.cat([v[:, :1, None].expand(b, k, 1), v[:, 1:].view(b, k, depth)], 2)  # (B, K, l + 1)

    def _value(self, x: Tensor) -> Tensor:
        """(..., C) prefix features -> (...) value."""
        return self.head(x + self.mlp(self.ln(x))).squeeze(-1)
