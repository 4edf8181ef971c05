"""Trie-constrained beam search over semantic-ID levels (GPR §5), batched and model-agnostic.

    result = beam_search(step_fn, tok.trie, batch_size=B, beam_width=16, top_k=4, eligible=has_budget)
    result.items     # (B, K) int64 ad indices, -1 where fewer than K legal items exist
    result.codes     # (B, K, L') their paths
    result.log_prob  # (B, K) summed legal-renormalised log-probabilities

The model is seen only through two callables, so any policy (HSTU decoder, MLP, lookup table) plugs in:

| callable | signature | meaning |
|---|---|---|
| ``step_fn`` | ``(context_index (M,), prefix_codes (M, l)) -> (M, K_l)`` | scores of the next code (logits or log-probs) |
| ``value_fn`` | ``(context_index (M,), prefix_codes (M, l)) -> (M,)`` | HTE estimate of the final value of a prefix |

``context_index`` names the request row in ``[0, B)``, so the callables can look up (or cache) the
user's encoded context. At level l the search renormalises ``step_fn`` over the *legal* codes only
(``masked_fill(~legal, -inf)`` then ``log_softmax``): a code is legal when the trie has a child there
and, with ``eligible``, at least one eligible item lies below it. Every beam therefore stays on the trie
and every emitted item is a leaf item that is eligible (GPR §5: "every beam is valid").

State is (B, w) tensors flattened to (B*w, ...) for the callables; the only Python loop is over the L'
levels. The width starts at 1 (the root) and grows to ``min(W, w * K_l)``, so beams never share a
prefix: each candidate is a distinct (parent, code) pair. Candidates that are illegal score -inf; when
a row has fewer legal candidates than its width, the remaining beams are padding (-inf, node -1) and are
never emitted. Padding beams carry their row's best prefix, so ``step_fn`` only sees prefixes of real
paths (except in a row where no item is eligible at all, whose codes are arbitrary in-range values).

Value guidance (both off by default):

* **ranking**: with ``value_fn`` and ``value_weight`` = lam, beams are ranked at every level (the final
  one included) by ``log_prob + lam * value_fn(prefix)``. The value is evaluated for every candidate prefix,
  i.e. on (B * w * K_l) prefixes per level, legal or not (its output at illegal candidates is ignored).
  ``log_prob`` itself stays the pure model log-probability.
* **width** (``width_temperature`` = t): each surviving parent beam gets a quota of children
  ``ceil(W * softmax(value / t))`` taken over the row's live parents, and its best-ranked children
  within the quota take the W slots first. High-value prefixes widen (more of their children kept),
  low-value ones are pruned to a child or two; the total width stays W. A large t gives every parent
  quota >= W / w (about plain beam search when w is small); a small t spends the width on the best parent.
  Slots that the quotas leave empty (a parent with fewer legal children than its quota) are filled by
  the best over-quota candidates, so a row is never narrower than plain beam search would keep it.
  Not done: widths that differ between rows (a per-request budget); every row keeps W beams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpr_sim.tokenizer.trie import PrefixTrie

StepFn = Callable[[Tensor, Tensor], Tensor]
"""(context_index (M,) int64, prefix_codes (M, l) int64) -> (M, K_l) next-code scores"""
ValueFn = Callable[[Tensor, Tensor], Tensor]
"""(context_index (M,) int64, prefix_codes (M, l) int64) -> (M,) value estimate of the prefix"""


class BeamResult(NamedTuple):
    """Top-K decoded items per row, best first.

    Fields:
        items: (B, K) int64 original item indices (trie order), -1 past the legal items of a row.
        codes: (B, K, L') int64 paths, -1 rows for missing items.
        log_prob: (B, K) float32 summed legal-renormalised log-probabilities, -inf for missing items.
        value: (B, K) float32 ``value_fn`` of the full paths (NaN for missing items), or None.
    """

    items: Tensor
    codes: Tensor
    log_prob: Tensor
    value: Tensor | None


def _eligible_counts(trie: PrefixTrie, eligible: Tensor | None, batch_size: int) -> Tensor | None:
    """Prefix counts of eligible items in sorted-item order: (N+1,) or (B, N+1) int32, or None.

    ``counts[..., j]`` = eligible items among the first j sorted items, so a node covering sorted items
    [lo, hi) holds an eligible item iff ``counts[hi] > counts[lo]``. Built once per search (not per level
    and beam, which ``PrefixTrie.legal_mask`` would do on a (B*W, N) mask).
    """
    if eligible is None:
        return None
    n = trie.num_items
    if eligible.dtype != torch.bool or eligible.dim() not in (1, 2) or eligible.shape[-1] != n:
        raise ValueError(
            f"eligible must be bool (N,) or (B, N) with N={n}, got {tuple(eligible.shape)} {eligible.dtype}"
        )
    if eligible.dim() == 2 and eligible.shape[0] != batch_size:
        raise ValueError(f"eligible has {eligible.shape[0]} rows, expected batch_size={batch_size}")
    sorted_el = eligible.to(trie.device).index_select(-1, trie.order)
    counts = torch.zeros(*sorted_el.shape[:-1], n + 1, dtype=torch.int32, device=trie.device)
    counts[..., 1:] = torch.cumsum(sorted_el, -1, dtype=torch.int32)
    return counts


def _has_eligible(trie: PrefixTrie, counts: Tensor, nodes: Tensor, depth: int) -> Tensor:
    """(B, C) in-range node ids at ``depth`` -> (B, C) bool: an eligible item lies below the node."""
    starts = trie.node_start[depth]
    lo, hi = starts[nodes], starts[nodes + 1]
    if counts.dim() == 1:
        return counts[hi] > counts[lo]
    return counts.gather(1, hi) > counts.gather(1, lo)


def _children(trie: PrefixTrie, node: Tensor, depth: int) -> Tensor:
    """(B, w) node ids at ``depth`` (-1 = padding beam) -> (B*w, K_depth) int64 child ids, -1 = none.

    Same as ``trie.next_node`` on every (beam, code) pair, but a dense level is one row gather of its
    child table instead of (B*w*K)-long repeated node and code vectors.
    """
    flat = node.flatten()
    table = trie.children[depth]
    if table is None:  # binary-search level
        k = trie.level_sizes[depth]
        codes = torch.arange(k, device=flat.device).repeat(flat.shape[0])
        return trie.next_node(flat.repeat_interleave(k), codes, depth).view(-1, k)
    return table[flat.clamp_min(0)].long().masked_fill((flat < 0)[:, None], -1)


def _leaf_items(trie: PrefixTrie, counts: Tensor | None, leaves: Tensor) -> Tensor:
    """(B, K) leaf node ids (-1 = none) -> (B, K) item: the first *eligible* item under each leaf.

    With unique paths a leaf holds one item; with shared paths the first item may be ineligible, so the
    first eligible sorted position p >= lo is found as the first j with counts[j] > counts[lo], p = j - 1.
    """
    if counts is None:
        return trie.leaf_item(leaves.flatten()).view_as(leaves)
    lo = trie.node_start[trie.depth][leaves.clamp_min(0)]  # (B, K)
    if counts.dim() == 1:
        pos = torch.searchsorted(counts, counts[lo] + 1) - 1
    else:
        pos = torch.searchsorted(counts, counts.gather(1, lo) + 1) - 1
    item = trie.order[pos.clamp(0, trie.num_items - 1)]
    return torch.where(leaves >= 0, item, -1)


def beam_search(
    step_fn: StepFn,
    trie: PrefixTrie,
    batch_size: int,
    beam_width: int,
    top_k: int,
    *,
    eligible: Tensor | None = None,
    value_fn: ValueFn | None = None,
    value_weight: float = 0.0,
    width_temperature: float | None = None,
    length: int | None = None,
) -> BeamResult:
    """Batched beam search over the trie's levels; every returned item is an eligible trie leaf.

    Args:
        step_fn: next-code scores, see the module table; normalised over legal codes here.
        trie: the decodable items (e.g. ``WorldTokenizer.trie``, ads only).
        batch_size: B request rows; ``context_index`` passed to the callables lies in [0, B).
        beam_width: W beams kept per row at every level.
        top_k: K <= W items returned per row.
        eligible: optional bool item mask in original item order, (N,) shared or (B, N) per row (e.g.
            ads whose advertiser has budget left); subtrees without an eligible item are pruned.
        value_fn: optional HTE value of a prefix; needed by ``value_weight`` and ``width_temperature``.
        value_weight: beams are ranked by ``log_prob + value_weight * value`` (0: by log_prob alone).
        width_temperature: if set, value-guided width (module docstring): per-parent child quotas
            ``ceil(W * softmax(value / t))``.
        length: path length L'; must equal ``trie.depth`` (a check for callers holding L' elsewhere).

    Returns:
        ``BeamResult`` with (B, K) items, (B, K, L') codes, (B, K) log_prob and value, best first.
    """
    depth = trie.depth if length is None else length
    if depth != trie.depth:
        raise ValueError(f"length={length} must equal the trie depth {trie.depth}: only leaves are items")
    if batch_size < 1 or beam_width < 1:
        raise ValueError(f"batch_size and beam_width must be >= 1, got {batch_size} and {beam_width}")
    if not 1 <= top_k <= beam_width:
        raise ValueError(f"top_k must lie in [1, beam_width={beam_width}], got {top_k}")
    needs_value = value_weight != 0.0 or width_temperature is not None
    if needs_value and value_fn is None:
        raise ValueError("value_weight != 0 or width_temperature needs a value_fn")
    if width_temperature is not None and not width_temperature > 0:
        raise ValueError(f"width_temperature must be > 0, got {width_temperature}")

    dev = trie.device
    b, w_max = batch_size, beam_width
    counts = _eligible_counts(trie, eligible, b)
    rows = torch.arange(b, device=dev)
    node = trie.root(b)[:, None]  # (B, w) node ids at the current depth, -1 = padding beam
    codes = torch.zeros(b, 1, 0, dtype=torch.int64, device=dev)  # (B, w, l)
    log_prob = torch.zeros(b, 1, device=dev)  # (B, w)
    value = None  # (B, w) value of each beam's prefix, once known
    for d in range(depth):
        w, k = node.shape[1], trie.level_sizes[d]
        ctx = rows.repeat_interleave(w)  # (B*w,)
        logits = step_fn(ctx, codes.reshape(b * w, d))
        if logits.shape != (b * w, k):
            raise ValueError(f"step_fn returned {tuple(logits.shape)} at level {d}, expected {(b * w, k)}")
        # children of every (beam, code): -1 where the trie has none or the beam is padding
        child = _children(trie, node, d).view(b, w * k)
        legal = child >= 0
        if counts is not None:
            legal &= _has_eligible(trie, counts, child.clamp_min(0), d + 1)
        legal = legal.view(b * w, k)
        # renormalise over legal codes only; rows with none give NaN here and are masked right after
        logp = F.log_softmax(logits.float().masked_fill(~legal, -math.inf), -1).masked_fill(~legal, -math.inf)
        cand_lp = (log_prob[:, :, None] + logp.view(b, w, k)).view(b, w * k)  # (B, w*K)
        score = cand_lp
        cand_value = None
        if value_fn is not None:  # value of every candidate prefix: parent prefix then the code
            cand_codes = torch.cat(
                [codes.repeat_interleave(k, 1), torch.arange(k, device=dev).repeat(b, w)[:, :, None]], -1
            )  # (B, w*K, l+1)
            cand_value = value_fn(rows.repeat_interleave(w * k), cand_codes.view(b * w * k, d + 1))
            cand_value = cand_value.float().view(b, w * k)
            if value_weight != 0.0:
                score = torch.where(legal.view(b, w * k), cand_lp + value_weight * cand_value, -math.inf)
        in_quota = None
        if width_temperature is not None and value is not None and w > 1:
            in_quota = _width_quota(score.view(b, w, k), value, node >= 0, w_max, width_temperature)
        # top-W distinct (parent, code) candidates; sorted so column 0 is the row's best beam
        top_score, idx = _select(score, min(w_max, w * k), in_quota)  # (B, w')
        alive = top_score > -math.inf
        node = torch.where(alive, child.gather(1, idx), -1)
        log_prob = torch.where(alive, cand_lp.gather(1, idx), -math.inf)
        parent = (idx // k)[:, :, None].expand(-1, -1, d)  # candidate column = parent * K + code
        codes = torch.cat([codes.gather(1, parent), (idx % k)[:, :, None]], -1)  # (B, w', l+1)
        # padding beams copy the best beam's prefix so step_fn only ever sees prefixes of real paths
        codes = torch.where(alive[:, :, None], codes, codes[:, :1])
        value = None if cand_value is None else cand_value.gather(1, idx)

    n_out = min(top_k, node.shape[1])
    alive = node[:, :n_out] >= 0
    items = _leaf_items(trie, counts, node[:, :n_out])
    out_codes = torch.where(alive[:, :, None], codes[:, :n_out], -1)
    out_lp = log_prob[:, :n_out]
    out_value = None if value is None else torch.where(alive, value[:, :n_out], math.nan)
    if n_out < top_k:  # the trie has fewer than K leaves: pad the columns
        pad = top_k - n_out
        items = F.pad(items, (0, pad), value=-1)
        out_codes = F.pad(out_codes, (0, 0, 0, pad), value=-1)
        out_lp = F.pad(out_lp, (0, pad), value=-math.inf)
        out_value = None if out_value is None else F.pad(out_value, (0, pad), value=math.nan)
    return BeamResult(items, out_codes, out_lp, out_value)


def _select(score: Tensor, width: int, in_quota: Tensor | None) -> tuple[Tensor, Tensor]:
    """Best ``width`` candidates per row, sorted by score: (B, width) scores and column indices.

    With ``in_quota`` (B, C) bool, candidates within their parent's quota are taken first and the others
    only fill the slots left (a parent with fewer legal children than its quota must not narrow the row).
    """
    if in_quota is None:
        return _topk(score, width)
    s_in, i_in = _topk(score.masked_fill(~in_quota, -math.inf), width)
    s_out, i_out = _topk(score.masked_fill(in_quota, -math.inf), width)
    s_all, i_all = torch.cat([s_in, s_out], 1), torch.cat([i_in, i_out], 1)  # (B, 2*width)
    # finite in-quota first, then finite over-quota, then padding; stable keeps each group's order
    first = (s_all == -math.inf).int().sort(dim=1, stable=True).indices[:, :width]
    s_pick, i_pick = s_all.gather(1, first), i_all.gather(1, first)
    s_sorted, order = s_pick.sort(dim=1, descending=True, stable=True)  # best first again
    return s_sorted, i_pick.gather(1, order)


FUSED_TOPK_MAX = 16
"""under ``torch.compile``, widths up to this are taken by repeated max passes (see ``_topk``)"""


def _topk(score: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``score.topk(width, dim=1)``: (B, width) values, best first, and their column indices.

    Eager calls ``topk``. Under ``torch.compile`` aten's topk stays an opaque radix select of a dozen
    kernels (5% of a fused rollout step on an H100), so a small width is taken as ``width`` max passes,
    each masking the column just taken: one fused reduction over rows short enough to stay in registers.
    Ties go to the lowest column there (eager ``topk`` leaves their order unspecified); rows with fewer
    than ``width`` finite scores repeat a -inf column, which callers treat as padding either way.
    """
    if not torch.compiler.is_compiling() or width > FUSED_TOPK_MAX:
        return score.topk(width, dim=1)
    cols = torch.arange(score.shape[1], device=score.device)
    values, indices = [], []
    for _ in range(width):
        v, i = score.max(dim=1)
        values.append(v)
        indices.append(i)
        score = score.masked_fill(cols == i[:, None], -math.inf)
    return torch.stack(values, 1), torch.stack(indices, 1)


def _width_quota(
    score: Tensor, parent_value: Tensor, parent_alive: Tensor, beam_width: int, temperature: float
) -> Tensor:
    """Value-guided width: which children lie within their parent's ``ceil(W * softmax(value / t))``.

    Args:
        score: (B, w, K) candidate ranking scores (-inf = illegal).
        parent_value: (B, w) value of each parent beam's prefix.
        parent_alive: (B, w) bool, False for padding beams.
        beam_width: W, the total width the quotas share.
        temperature: t > 0 of the softmax over a row's live parents.

    Returns:
        (B, w*K) bool: the candidate is among its parent's best ``quota`` children.
    """
    logits = (parent_value / temperature).masked_fill(~parent_alive, -math.inf)
    share = torch.softmax(logits, -1).nan_to_num(0.0)  # rows with no live parent: all-NaN -> 0
    quota = torch.ceil(beam_width * share)  # (B, w): sums to >= W over live parents
    rank = score.argsort(-1, descending=True).argsort(-1)  # (B, w, K) rank of each child in its parent
    return (rank < quota[:, :, None]).flatten(1)
