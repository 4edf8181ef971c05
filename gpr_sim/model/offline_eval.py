"""Offline ranking metrics of a generator: HitRate@K and nDCG@K on held-out logs, candidate quality.

    ranked = model_rankings(model, tokens, tok.trie, top_k=10, beam_width=20)   # (B, K) ad indices
    ranking_metrics(ranked, target)          # {"hitrate@10": ..., "ndcg@10": ...}
    ranking_metrics(popularity_rankings(train_ads, num_ads, 10, B), target)      # the baseline

The target of a request is its head-0 MTP target (``gpr_sim.model.targets``): the next ad its session
showed. With one relevant item, nDCG@K = 1 / log2(rank + 2) at its 0-based rank (0 if not in the top K),
so the ideal DCG is 1.

``candidate_metrics`` scores K generated candidates against the simulator's true values instead (GPR
Table 3: nDCG, OPR, mean and max normalised final_value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpr_sim.decoding import beam_search
from gpr_sim.model.gpr import GPRModel
from gpr_sim.schema import TokenBatch
from gpr_sim.tokenizer.trie import PrefixTrie


def ranking_metrics(ranked: Tensor, target: Tensor) -> dict[str, float]:
    """HitRate@K and nDCG@K of a single relevant item per row.

    Args:
        ranked: (B, K) int64 item indices, best first (-1 = empty slot).
        target: (B,) int64 the relevant item of each row (rows with -1 must be dropped before).

    Returns:
        ``{"hitrate@K": mean hit, "ndcg@K": mean 1 / log2(rank + 2)}``.
    """
    if (target < 0).any():
        raise ValueError("target holds -1: drop rows without a target first")
    k = ranked.shape[1]
    hit = ranked == target[:, None]  # (B, K), at most one True per row when items are distinct
    gain = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)  # (K,)
    ndcg = (hit.double() * gain).sum(1)
    return {f"hitrate@{k}": float(hit.any(1).double().mean()), f"ndcg@{k}": float(ndcg.mean())}


def popularity_rankings(train_ads: Tensor, num_ads: int, top_k: int, batch_size: int) -> Tensor:
    """(B, K) the K ads shown most often in training (ties: lower index first), the same for every row.

    Args:
        train_ads: (M,) int64 shown ads of the training requests (-1 entries are ignored).
    """
    counts = torch.bincount(train_ads[train_ads >= 0], minlength=num_ads).double()
    # stable descending sort keeps lower indices first among ties
    top = torch.sort(counts, descending=True, stable=True).indices[:top_k]
    return top[None].expand(batch_size, -1)


@torch.no_grad()
def model_rankings(
    model: GPRModel,
    tokens: TokenBatch,
    trie: PrefixTrie,
    top_k: int,
    beam_width: int,
    chunk: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, K) ads decoded by trie-constrained beam search with the model's head 0 (GPR §5).

    Args:
        model: the generator (put in eval mode by the caller).
        tokens: TokenBatch of B requests, on the model's device.
        trie: the ad trie, on the model's device.
        top_k: K items per row; ``beam_width`` >= K beams per level.
        chunk: requests encoded and searched at once (bounds memory).
        generator: randomness of the refiner (fixed seed = reproducible rankings).
    """
    if beam_width < top_k:
        raise ValueError(f"beam_width={beam_width} must be >= top_k={top_k}")
    b = tokens.token_ids.shape[0]
    out = [torch.empty(0, top_k, dtype=torch.int64)]  # no rows -> (0, K)
    for lo in range(0, b, chunk):
        part = TokenBatch(*(t[lo : lo + chunk] for t in tokens))
        ctx = model.context(part, generator)  # (b', Cc, C)
        step_fn, _ = model.beam_fns(ctx)
        res = beam_search(step_fn, trie, batch_size=ctx.shape[0], beam_width=beam_width, top_k=top_k)
        out.append(res.items.cpu())
    return torch.cat(out)


def candidate_metrics(values: Tensor, present: Tensor, best: Tensor) -> dict[str, float]:
    """GPR Table 3 quality of K generated candidates per request, in the model's order (best first).

    Args:
        values: (B, K) true final_value of each candidate (any finite value where absent).
        present: (B, K) bool, False past the candidates a row actually has.
        best: (B,) the best final_value any eligible ad reaches for the request (the normaliser).

    Returns:
        ``ndcg``: DCG of the model's order over the ideal order of the same candidates, with the
        normalised value as gain; ``opr``: share of candidate pairs (with different values) that the model
        orders as their true values; ``mean_value`` / ``max_value``: mean and max over candidates of
        value / best (1 = the best ad of the whole eligible catalogue); ``top1_value``: value / best of the
        first candidate (the one a single-slot request serves). Averages over rows with a candidate and a
        positive ``best``.
    """
    rows = present.any(1) & (best > 0)
    gain = torch.where(present, (values / best.clamp_min(1e-12)[:, None]).clamp_min(0.0), 0.0)[rows].double()
    keep = present[rows]
    k = gain.shape[1]
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=gain.device) + 2.0)
    dcg = (gain * discount).sum(1)
    idcg = (gain.sort(1, descending=True).values * discount).sum(1)
    ndcg = torch.where(idcg > 0, dcg / idcg.clamp_min(1e-12), 1.0)
    earlier = torch.triu(
        torch.ones(k, k, dtype=torch.bool, device=gain.device), 1
    )  # pair (i, j) with i ranked above j
    both = keep[:, :, None] & keep[:, None, :] & earlier
    diff = gain[:, :, None] - gain[:, None, :]
    pairs = both & (diff != 0)
    right = (pairs & (diff > 0)).sum((1, 2)).double()
    n_pairs = pairs.sum((1, 2)).double()
    has_pairs = n_pairs > 0
    count = keep.sum(1).clamp_min(1).double()
    nan = float("nan")
    return {
        "ndcg": float(ndcg.mean()) if rows.any() else nan,
        "opr": float((right[has_pairs] / n_pairs[has_pairs]).mean()) if has_pairs.any() else nan,
        "mean_value": float((gain.sum(1) / count).mean()) if rows.any() else nan,
        "max_value": float(gain.max(1).values.mean()) if rows.any() else nan,
        "top1_value": float(gain[:, 0].mean()) if rows.any() else nan,
    }


__all__ = ["ranking_metrics", "popularity_rankings", "model_rankings", "candidate_metrics"]
