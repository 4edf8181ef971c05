"""Semantic-ID quality metrics of GPR §2 / Table 1, with the precise definitions we use.

Let ``codes`` be (N, L): item i's path is the row ``codes[i]``. Items with identical rows form a group.

| metric | definition |
|---|---|
| collision rate | share of items whose full path is shared with at least one other item: (1/N) #{i : |group(i)| > 1} |
| CUR_l | share of the K codes of level l used by at least one item (over all items, not per parent node): |{codes[i, l]}| / K |
| PAS | mean of cos(e_i, e_j) over all unordered pairs {i, j}, i != j, with identical full paths (pairs pooled over groups, so a group of n items weighs n(n-1)/2); NaN when no two items share a path |
| recon MSE | mean over the N x D entries of (x - decode(encode(x)))^2 |

PAS is computed without enumerating pairs: for unit vectors u in a group, the sum over pairs of
u_i.u_j equals (||sum_i u_i||^2 - sum_i ||u_i||^2) / 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpr_sim.tokenizer.rq_kmeans import Quantizer


def path_keys(codes: Tensor) -> Tensor | None:
    """(N,) int64 mixed-radix key of each (N, L) row, ordered as the rows are lexicographically; None when
    the digits' ranges do not fit one int64 (then rows must be compared whole).

    Digit l is shifted by its column minimum and weighed by the product of the later columns' ranges, so
    equal rows give equal keys and key order is lexicographic row order.
    """
    if codes.numel() == 0:
        return None
    lo, hi = codes.amin(0), codes.amax(0)  # (L,) one sync below: the radices decide the encoding
    radix = (hi - lo + 1).tolist()
    if any(r <= 0 for r in radix) or math.prod(radix) >= 2**63:  # r <= 0: int64 wrap-around of hi - lo
        return None
    key = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    for col, r in enumerate(radix):
        key = key * r + (codes[:, col] - lo[col])
    return key


def group_paths(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Group identical paths.

    ``torch.unique(dim=0)`` over the rows gives the answer but sorts whole rows (seconds on millions of
    items); each row is encoded as one int64 key (``path_keys``) and the keys are grouped with a 1-D
    unique instead, which is the same grouping in the same (lexicographic) order. Rows whose digit ranges
    overflow int64 keys fall back to the row-wise unique.

    Args:
        codes: (N, L) int64 paths.

    Returns:
        inverse (N,) group id of every item (groups in lexicographic path order), counts (G,) group sizes.
    """
    key = path_keys(codes) if codes.dim() == 2 else None
    if key is None:
        _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        return inverse, counts
    _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    return inverse, counts


def collision_rate(codes: Tensor) -> float:
    """Share of items whose full path (N, L) row is shared with another item."""
    inverse, counts = group_paths(codes)
    return float((counts[inverse] > 1).double().mean())


def codebook_utilization(codes: Tensor, codebook_size: int) -> Tensor:
    """CUR per level: share of the K codes of level l used by any item.

    Args:
        codes: (N, L) int64 with values in [0, codebook_size).
        codebook_size: K.

    Returns:
        (L,) float64 in [0, 1].
    """
    used = torch.zeros(codes.shape[1], codebook_size, dtype=torch.bool, device=codes.device)  # (L, K)
    levels = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)  # (N, L)
    used[levels.reshape(-1), codes.reshape(-1)] = True
    return used.double().mean(1)


def path_alignment_score(codes: Tensor, embeddings: Tensor) -> float:
    """PAS: mean cosine similarity over all pairs of distinct items sharing a full path.

    Args:
        codes: (N, L) int64 paths.
        embeddings: (N, D) original item embeddings (before any encoder).

    Returns:
        The pair-weighted mean cosine, or NaN when no path is shared.
    """
    inverse, counts = group_paths(codes)
    u = F.normalize(embeddings.double(), dim=1)  # (N, D); a zero vector stays zero
    g = counts.shape[0]
    sums = torch.zeros(g, u.shape[1], dtype=u.dtype, device=u.device).index_add_(0, inverse, u)  # (G, D)
    sq = torch.zeros(g, dtype=u.dtype, device=u.device).index_add_(0, inverse, (u * u).sum(1))  # (G,)
    pair_cos = ((sums * sums).sum(1) - sq) / 2  # (G,) sum over pairs i<j of u_i.u_j
    num_pairs = (counts * (counts - 1) // 2).sum()
    if int(num_pairs) == 0:
        return float("nan")
    return float(pair_cos.sum() / num_pairs)


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over all N x D entries of (x - x_hat)^2."""
    return float(((x.double() - x_hat.double()) ** 2).mean())


def quantizer_metrics(quantizer: Quantizer, embeddings: Tensor) -> dict[str, float]:
    """All Table-1 metrics of a fitted quantiser on ``embeddings`` (N, D).

    Returns:
        ``collision_rate``, ``cur_l1`` .. ``cur_lL``, ``pas``, ``recon_mse``.
    """
    codes = quantizer.encode(embeddings)
    out = {"collision_rate": collision_rate(codes)}
    for level, cur in enumerate(codebook_utilization(codes, quantizer.codebook_size).tolist()):
        out[f"cur_l{level + 1}"] = cur
    out["pas"] = path_alignment_score(codes, embeddings)
    out["recon_mse"] = reconstruction_mse(embeddings, quantizer.decode(codes))
    return out
