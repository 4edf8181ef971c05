"""Sample groups of semantic-ID paths from a policy, level by level on the trie (HEPO's rollout, GPR §4.3).

    s = sample_paths(step_fn, tok.trie, batch_size=B, group_size=K, eligible=has_budget, generator=g)
    s.items      # (B, K) item index of each sampled path (always a legal, eligible leaf)
    s.codes      # (B, K, L') the paths
    s.log_prob   # (B, K, L') log pi(z_l | context, z_<l) under the legal-renormalised policy
    s.legal      # L' masks (B, K, K_l): the legal codes at each level (needed to recompute log-probs)

``step_fn`` is the callable of ``gpr_sim.decoding`` (``(row (M,), prefix (M, l)) -> (M, K_l)`` logits),
so beam search and sampling see the model through the same interface. Level 0 is scored once per row and
its K codes drawn together; deeper levels are scored per sampled prefix (B * K rows). A row with no
eligible item at all (every budget spent) samples over the whole trie and is flagged in ``valid``; its
items cannot win an auction, and learners skip it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gpr_sim.decoding import StepFn
from gpr_sim.tokenizer.trie import PrefixTrie


class PathSample(NamedTuple):
    items: Tensor  # (B, K) int64 item index (the trie's original order)
    codes: Tensor  # (B, K, L') int64
    log_prob: Tensor  # (B, K, L') float32 per-level log-probabilities of the sampled codes
    legal: list[Tensor]  # L' of (B, K, K_l) bool
    valid: Tensor  # (B,) bool: the row had an eligible item


def _masks(trie: PrefixTrie, nodes: Tensor, depth: int, eligible: Tensor | None, valid: Tensor) -> Tensor:
    """Legal next codes at ``nodes``: eligible-restricted for valid rows, the plain trie for the others."""
    plain = trie.legal_mask(nodes, depth)
    if eligible is None:
        return plain
    return torch.where(valid[:, None], trie.legal_mask(nodes, depth, eligible), plain)


def _draw(logp: Tensor, n: int, generator: torch.Generator | None, u: Tensor | None) -> Tensor:
    """``n`` codes per row of ``logp`` (R, C) with replacement: multinomial, or inverse CDF of ``u`` (R, n)."""
    p = logp.exp()
    if u is None:
        return torch.multinomial(p, n, replacement=True, generator=generator)
    cdf = p.cumsum(-1)
    code = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=p.shape[1] - 1)
    # rounding can land on a zero-probability code at the very top of the CDF: take the likeliest then
    return torch.where(p.gather(1, code) > 0, code, p.argmax(1, keepdim=True).expand_as(code))


def sample_paths(
    step_fn: StepFn,
    trie: PrefixTrie,
    batch_size: int,
    group_size: int,
    eligible: Tensor | None = None,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> PathSample:
    """Draw ``group_size`` paths per row from the policy, restricted to legal (and eligible) codes.

    Args:
        step_fn: next-code logits (module doc).
        trie: the item trie (e.g. ``WorldTokenizer.trie``).
        batch_size: B rows.
        group_size: K paths per row, drawn independently (with replacement).
        eligible: optional (num_items,) bool shared by all rows; only paths to eligible items are drawn.
        generator: randomness of the draws (``torch.multinomial``).
        uniforms: (B, K, L') numbers in (0, 1) instead of ``generator``: path k of row b takes at level l
            the code where ``uniforms[b, k, l]`` falls in the cumulative distribution (inverse CDF). Keyed
            per row (``gpr_sim.world.rng``), a row's draws then do not depend on the batch it is in
            (data-parallel shards draw what one process draws).

    Returns:
        ``PathSample``.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size} is invalid: expected >= 1")
    b, k, dev = batch_size, group_size, trie.device
    root = trie.root(b)
    valid = torch.ones(b, dtype=torch.bool, device=dev)
    if eligible is not None:
        valid = trie.legal_mask(root, 0, eligible).any(1)
    rows = torch.arange(b, device=dev)
    # level 0: one score per row, K codes drawn at once
    mask = _masks(trie, root, 0, eligible, valid)  # (B, K_0)
    logp = step_fn(rows, torch.zeros(b, 0, dtype=torch.int64, device=dev)).float()
    logp = logp.masked_fill(~mask, float("-inf")).log_softmax(-1)
    code = _draw(logp, k, generator, None if uniforms is None else uniforms[..., 0])  # (B, K)
    codes, log_probs, legal = [code], [logp.gather(1, code)], [mask[:, None].expand(b, k, -1)]
    # deeper levels: one score per sampled prefix
    rows_k = rows.repeat_interleave(k)  # (B*K,)
    valid_k = valid.repeat_interleave(k)
    nodes = trie.next_node(root.repeat_interleave(k), code.reshape(-1), 0)  # (B*K,)
    for depth in range(1, trie.depth):
        prefix = torch.stack(codes, -1).reshape(b * k, depth)
        mask = _masks(trie, nodes, depth, eligible, valid_k)  # (B*K, K_l)
        logp = step_fn(rows_k, prefix).float().masked_fill(~mask, float("-inf")).log_softmax(-1)
        u = None if uniforms is None else uniforms[..., depth].reshape(b * k, 1)
        code = _draw(logp, 1, generator, u).squeeze(1)  # (B*K,)
        codes.append(code.view(b, k))
        log_probs.append(logp.gather(1, code[:, None]).view(b, k))
        legal.append(mask.view(b, k, -1))
        nodes = trie.next_node(nodes, code, depth)
    items = trie.leaf_item(nodes).view(b, k)
    return PathSample(items, torch.stack(codes, -1), torch.stack(log_probs, -1), legal, valid)


__all__ = ["PathSample", "sample_paths"]
