"""Offline ranking metrics of a generator on held-out logged requests: HitRate@K and nDCG@K.

    ranked = model_rankings(model, tokens, tok.trie, top_k=10, beam_width=20)   # (B, K) ad indices
    ranking_metrics(ranked, target)          # {"hitrate@10": ..., "ndcg@10": ...}
    ranking_metrics(popularity_rankings(train_ads, num_ads, 10, B), target)      # the baseline

The target of a request is its head-0 MTP target (``gpr_sim.model.targets``): the next ad its session
showed. With one relevant item, nDCG@K = 1 / log2(rank + 2) at its 0-based rank (0 if not in the top K),
so the ideal DCG is 1.
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


__all__ = ["ranking_metrics", "popularity_rankings", "model_rankings"]
