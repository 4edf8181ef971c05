"""HSD: the sequence-wise decoder of GPR §3 (HSTU-style blocks over typed U/O/I/E tokens).

Hybrid mask (``hybrid_mask``; True = the query may attend to the key). The schema layout is
``[U | O x Ho | I x Hi | E]`` with E last, so "prompt bidirectional, I causal" needs a choice for E:

| query \\ key | U, O | I or E at slot <= query | I or E at slot > query |
|---|---|---|---|
| U, O | yes | no | no |
| I | yes | I: yes, E: no | no |
| E | yes | yes | no |

- U/O see each other both ways (the static part of the prompt).
- E is the current request: it sees every slot up to itself, i.e. the whole sequence in the schema
  layout (E last), and its output is the request representation. Tokens appended after E (ads being
  decoded) do not change E.
- I tokens are causal over slots and see U/O but **not E**: E describes the request being answered,
  which comes after every history ad. Likewise U/O do not see E: if they did, information from E (which
  sees every I) would flow back into earlier I tokens through U/O in the next layer.
  So no I token depends on a later I token or on E: teacher-forced targets at I positions do not
  leak, and no token ever depends on a later slot except U/O on U/O.
- Padding keys are masked out. U is never padding and every query sees U, so no row is empty.

With ``hybrid_attention=False`` the mask is plain causal over slots (plus key padding).

KV cache: ``HSD.forward(tokens, cache)`` treats ``tokens`` as slots appended after the cached ones
and returns hidden states of the new slots only. Since no cached token attends to a later I or E
slot, appending I and E tokens gives exactly the full forward (tested). Appending U/O tokens is
not supported: earlier U/O would have to see them (the cached rows would be stale).

Rollout step (``HSD.append``): the next request of a user is its previous sequence plus the ad just
shown (a new I token) and a new E token. Mark the old E slot as padding in the cache
(``KVCache.padding_mask[:, e_slot] = True``): every later query then ignores it, and the old E's own
row is never read again, so ``append([I_new, E_new], cache)`` equals the full forward of
``[U | O | I ... I_new | E_new]`` (positions continue from the old E's position: ``positions`` count
real tokens only). ``append`` does not concatenate the cache: it attends to the cached keys and the
new keys separately and merges the two softmax parts (``split_attention``), so the cache is read once
and never copied; it returns the new slots' K/V for the caller to store (e.g. in a preallocated buffer).
New O or U tokens (a refreshed organic history) cannot be appended exactly (see above): they need a
full re-encode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpr_sim.model.config import NUM_EVENTS, NUM_TYPES, GPRConfig
from gpr_sim.model.precision import to_stream
from gpr_sim.schema import TYPE_E, TYPE_I, TokenBatch


def hybrid_mask(type_ids: Tensor, padding_mask: Tensor, *, hybrid: bool = True) -> Tensor:
    """(B, T) type ids and padding -> (B, T, T) bool, True = query (dim 1) may attend to key (dim 2)."""
    return hybrid_mask_rows(type_ids, padding_mask, 0, hybrid=hybrid)


def hybrid_mask_rows(type_ids: Tensor, padding_mask: Tensor, start: int, *, hybrid: bool = True) -> Tensor:
    """Rows ``start..T-1`` of ``hybrid_mask``: (B, T) -> (B, T - start, T) (used by the KV-cache path)."""
    t = type_ids.shape[1]
    slot = torch.arange(t, device=type_ids.device)
    q_slot, k_slot = slot[start:, None], slot[None, :]  # (Tq, 1), (1, T)
    causal = (k_slot <= q_slot)[None]  # (1, Tq, T)
    if hybrid:
        q_type, k_type = type_ids[:, start:, None], type_ids[:, None, :]  # (B, Tq, 1), (B, 1, T)
        k_static = (k_type != TYPE_I) & (k_type != TYPE_E)  # U/O keys: seen by every query
        q_i = q_type == TYPE_I  # (B, Tq, 1)
        allowed = k_static | (q_i & (k_type == TYPE_I) & causal) | ((q_type == TYPE_E) & causal)  # (B, Tq, T)
    else:
        allowed = causal.expand(type_ids.shape[0], -1, -1)
    return allowed & ~padding_mask[:, None, :]


Segments = tuple[tuple[int, int, int], ...]
"""``(start, end, type)`` runs of one type over the slots, when every row has the same types (``type_segments``)"""


class TypedLayerNorm(nn.Module):
    """LayerNorm with one (gain, bias) per token type, gathered by type id (no loop over tokens).

    With the slot layout known (``segments``, ``type_segments``: every row has the same types), the gain and
    bias are per slot, (T, C), broadcast over the rows: one ``addcmul`` pass after the norm. Per token instead,
    two (B, T, C) tensors are gathered, multiplied and added: six more passes over the activations
    (``benchmarks/roofline_rl_iteration.py``: the typed norms were 28% of the rollout forward's eager bytes).
    """

    by_slot: bool = True
    """class default; False gathers per-token rows even with the layout known (``bench_rl_iteration``'s A/B)"""

    def __init__(self, d: int, n_types: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_types, d))
        self.bias = nn.Parameter(torch.zeros(n_types, d))

    def forward(self, x: Tensor, type_ids: Tensor, segments: Segments | None = None) -> Tensor:
        """x (B, T, C), type_ids (B, T) -> (B, T, C); ``segments`` as in ``TypedFFN.forward``."""
        if self.weight.shape[0] == 1:  # shared when 1 type: the fused norm's own affine
            return F.layer_norm(x, x.shape[-1:], self.weight[0], self.bias[0])
        x = F.layer_norm(x, x.shape[-1:])  # (B, T, C)
        if segments is not None and self.by_slot:
            if segments[-1][1] != x.shape[1]:
                raise ValueError(f"segments cover {segments[-1][1]} slots, the tokens have {x.shape[1]}")
            return torch.addcmul(slot_rows(self.bias, segments), x, slot_rows(self.weight, segments))
        return x * rows_of_type(self.weight, type_ids) + rows_of_type(self.bias, type_ids)


def slot_rows(table: Tensor, segments: Segments) -> Tensor:
    """(n, C) per-type rows and the slot layout -> (T, C), each slot its type's row (expanded, one copy)."""
    return torch.cat([table[t].expand(b - a, -1) for a, b, t in segments])


class _RowsOfType(torch.autograd.Function):
    """``table[ids]`` for a table of a few rows (one per token type) indexed by millions of ids.

    The forward is a gather. The backward is where the default paths are slow on a GPU: advanced
    indexing reduces with a sort-based ``index_put`` that walks each row's duplicates serially
    (pytorch/pytorch#41162), ``index_select``/``F.embedding`` with ``index_add``-style atomics that all
    land on the same n rows (measured: 29% of a bf16 HEPO update on an H200). Here it is one GEMM,
    ``one_hot(ids)^T @ grad`` (n x N x C), accumulated in float32 by cuBLAS and the CPU alike.
    """

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = table.shape[0]
        return table.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        one_hot = F.one_hot(ids, ctx.rows).to(grad.dtype)  # (N, n)
        return one_hot.transpose(0, 1) @ grad, None


def rows_of_type(table: Tensor, type_ids: Tensor, gemm: bool | None = None) -> Tensor:
    """(n, C) per-type rows and (...) type ids -> (..., C) = ``table[type_ids]``.

    ``gemm`` (default: on CUDA tensors) takes ``_RowsOfType``, whose backward is a GEMM rather than atomics
    on n rows. Elsewhere ``F.embedding``: on a CPU its backward is a sequential per-row sum, fast there, and
    it keeps the data-parallel parity test exact (measured with the GEMM: after two iterations, 2 gloo ranks
    differed from one process by up to 1.8e-4 in most LayerNorm gains, though each gradient is more accurate
    than the embedding's: the GEMM's blocking depends on N, and Adam's first steps scale every gradient,
    rounding included, to about +-lr).
    """
    if gemm is None:
        gemm = table.device.type == "cuda"
    if not gemm:
        return F.embedding(type_ids, table)
    flat = type_ids.reshape(-1)
    return _RowsOfType.apply(table, flat).view(*type_ids.shape, table.shape[-1])


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation whose inverse is known: the backward is the gather ``grad[inv]``
    instead of ``index_select``'s scatter-add (atomics, though no two rows collide)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def permute_rows(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    """(N, C) -> ``x[perm]`` with ``inv`` the inverse permutation (``inv[perm] = arange``): gathers both ways."""
    return _PermuteRows.apply(x, perm, inv)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


def type_segments(type_ids: Tensor) -> Segments | None:
    """(B, T) type ids -> the runs ``(start, end, type)`` of the slot layout when every row has the same types
    (the schema's layout, ``gpr_sim.schema``: ``U | O x Ho | I x Hi | E`` in every row), else None.

    Reads the ids on the host (one sync): a caller computes it once for many forwards (the RL update, once per
    rollout buffer) and passes it to ``HSD.forward(..., segments=)``, where the typed FFN then runs dense
    GEMMs per run instead of sorting the tokens by type.
    """
    if type_ids.dim() != 2 or 0 in type_ids.shape:  # no rows or no slots: no layout to read
        return None
    first = type_ids[:1]
    if not bool((type_ids == first).all()):
        return None
    row = first[0].tolist()
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            runs.append((start, i, int(row[start])))
            start = i
    return tuple(runs)


class TypedFFN(nn.Module):
    """One MLP per token type, each applied to its own tokens only, with no data-dependent shapes.

    Parameters are ``mlps[t].fc`` / ``mlps[t].proj`` (one ``MLP`` per type, as before: checkpoints load
    unchanged). Tokens are sorted by type once (static N), then both matmuls run per type group:

    | ``impl`` | how | used by ``"auto"`` |
    |---|---|---|
    | ``"grouped"`` | ``F.grouped_mm`` over the sorted tokens, group ends on device | CUDA, bf16, SM >= 9.0 |
    | ``"chunked"`` | sorted tokens in a padded (G, c, C) buffer, each chunk one type; ``bmm`` with the chunk's type weights | other CUDA |
    | ``"loop"`` | boolean indexing per type (one host sync per type on GPU; the reference) | CPU |
    | segments | ``forward(x, type_ids, segments)``: dense GEMMs per run of one type over the slots, no sort | whenever the caller passes ``segments`` (``type_segments``) |

    ``"chunked"``: every type's segment starts at a chunk boundary, so G = (N + n_types (c - 1)) // c chunks
    always suffice (a shape known from N alone); c ~ N / ``target_chunks`` keeps the padding below
    n_types / target_chunks of the FLOPs and the gathered weights at G small (G, C, H) copies.
    No host sync in ``"grouped"`` (fast path) or ``"chunked"``: both are ``torch.compile``-friendly.
    """

    impl: str = "auto"
    """class default; set ``TypedFFN.impl`` (or an instance's) to force ``grouped``/``chunked``/``loop``"""
    target_chunks: int = 128

    def __init__(self, d: int, hidden: int, n_types: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(MLP(d, hidden) for _ in range(n_types))

    def resolve_impl(self, x: Tensor) -> str:
        """The implementation ``forward`` uses for ``x`` (``impl``, with ``"auto"`` decided by device/dtype)."""
        if self.impl != "auto":
            return self.impl
        if x.device.type != "cuda":
            return "loop"  # no sync cost on CPU and the fewest FLOPs
        if _compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9:
            return "grouped"  # CUTLASS grouped GEMM; other dtypes/GPUs fall back to a host loop in aten
        return "chunked"

    def forward(self, x: Tensor, type_ids: Tensor, segments: Segments | None = None) -> Tensor:
        """x (B, T, C), type_ids (B, T) -> (B, T, C). ``segments``: the runs of ``type_segments(type_ids)``
        (the caller's promise that every row has that layout); then each run of slots goes through its
        type's MLP as one dense GEMM pair over all rows (on an H200 5.0 ms eager for a 1,024 x 256-token
        minibatch where the sorted grouped GEMMs take 7.4: ``benchmarks/bench_update_parts.py``)."""
        if len(self.mlps) == 1:
            return self.mlps[0](x)
        if segments is not None:
            return self._forward_segments(x, segments)
        impl = self.resolve_impl(x)
        if impl == "loop":
            return self._forward_loop(x, type_ids)
        shape = x.shape
        xf, tf = x.reshape(-1, shape[-1]), type_ids.reshape(-1)  # (N, C), (N,)
        if impl == "grouped":
            out = self._forward_grouped(xf, tf)
        elif impl == "chunked":
            out = self._forward_chunked(xf, tf)
        else:
            raise ValueError(f"TypedFFN.impl={impl!r} is invalid: expected auto, grouped, chunked or loop")
        return out.view(shape)

    def _forward_segments(self, x: Tensor, segments: Segments) -> Tensor:
        if segments[-1][1] != x.shape[1]:
            raise ValueError(f"segments cover {segments[-1][1]} slots, the tokens have {x.shape[1]}")
        if len(segments) == 1:
            return self.mlps[segments[0][2]](x)
        # split, not one slice per run: a slice's backward writes a zero-filled gradient of all of x and autograd
        # adds the runs' up; split's backward concatenates them once
        runs = x.split([b - a for a, b, _ in segments], 1)
        return torch.cat([self.mlps[t](run) for run, (_, _, t) in zip(runs, segments, strict=True)], 1)

    def _forward_loop(self, x: Tensor, type_ids: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # (B, T, C)
        for t, mlp in enumerate(self.mlps):
            sel = type_ids == t  # (B, T); (n_t, C) below: one host sync per type on GPU
            out[sel] = mlp(x[sel]).to(out.dtype)
        return out

    def _stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(n, H, C), (n, H), (n, C, H), (n, C) per-type fc/proj weights and biases."""
        fc_w = torch.stack([m.fc.weight for m in self.mlps])
        fc_b = torch.stack([m.fc.bias for m in self.mlps])
        pr_w = torch.stack([m.proj.weight for m in self.mlps])
        pr_b = torch.stack([m.proj.bias for m in self.mlps])
        return fc_w, fc_b, pr_w, pr_b

    def _sort(self, tf: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(N,) types -> sorted types, permutation (sorted -> original), its inverse (original -> sorted)
        and (n_types,) counts; all on device.

        A counting sort, giving the stable order of ``torch.sort(tf, stable=True)`` without a multi-pass
        radix sort of 64-bit keys: in the type-major one-hot (n_types, N) read as one vector, the running
        count at (t, i) is the tokens of lower types plus the tokens of type t up to i, i.e. token i's
        sorted slot + 1 when t is its type. One 1-D cumsum (one device scan; a scan along dim 0 of an
        (N, n_types) tensor measured far slower on an H100), and the inverse permutation comes for free.
        """
        n = tf.shape[0]
        one_hot = tf[None, :] == torch.arange(len(self.mlps), device=tf.device)[:, None]  # (n_types, N)
        counts = one_hot.sum(1)  # no bincount: it syncs
        running = one_hot.flatten().cumsum(0, dtype=torch.int32 if one_hot.numel() < 2**31 else torch.int64)
        inv = running[tf * n + torch.arange(n, device=tf.device)].long() - 1  # (N,) sorted slot of each token
        perm = torch.empty_like(inv)
        perm[inv] = torch.arange(n, device=tf.device)
        return tf.index_select(0, perm), perm, inv, counts

    def _forward_grouped(self, xf: Tensor, tf: Tensor) -> Tensor:
        dt = _compute_dtype(xf)
        st, perm, inv, counts = self._sort(tf)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (n_types,) group ends
        fc_w, fc_b, pr_w, pr_b = (p.to(dt) for p in self._stacked())
        xs = permute_rows(xf, perm, inv).to(dt)  # (N, C) grouped by type
        h = F.grouped_mm(xs, fc_w.transpose(1, 2), offs=offs) + rows_of_type(fc_b, st)  # (N, H)
        y = F.grouped_mm(F.gelu(h), pr_w.transpose(1, 2), offs=offs) + rows_of_type(pr_b, st)  # (N, C)
        return permute_rows(y, inv, perm)  # in the compute dtype, as an autocast Linear would return

    def _forward_chunked(self, xf: Tensor, tf: Tensor) -> Tensor:
        n, c_dim = xf.shape
        n_types = len(self.mlps)
        dev = xf.device
        c = max(16, -(-n // self.target_chunks))
        c = -(-c // 16) * 16  # chunk length, a multiple of 16
        g = (n + n_types * (c - 1)) // c  # chunks that always suffice
        st, perm, _, counts = self._sort(tf)
        start = torch.cumsum(counts, 0) - counts  # (n_types,) first sorted position of each type
        padded = (counts + c - 1) // c * c
        pend = torch.cumsum(padded, 0)
        pstart = pend - padded  # (n_types,) first buffer slot of each type
        slot = torch.arange(g * c, device=dev)
        chunk_type = torch.searchsorted(pend, torch.arange(g, device=dev) * c, right=True)  # (G,)
        chunk_type = chunk_type.clamp_max(n_types - 1)  # chunks past the last type: padding
        slot_type = chunk_type.repeat_interleave(c)  # (G*c,)
        rel = slot - pstart[slot_type]
        valid = (rel >= 0) & (rel < counts[slot_type])
        src = perm[(start[slot_type] + rel).clamp(0, n - 1)]  # (G*c,) original token of each slot
        xb = xf.index_select(0, src) * valid[:, None].to(xf.dtype)  # (G*c, C), padding rows 0
        # buffer slot of every original token: sorted position i -> pstart[type] + (i - start[type])
        dest_sorted = pstart[st] + torch.arange(n, device=dev) - start[st]
        dest = torch.empty_like(dest_sorted)
        dest[perm] = dest_sorted
        fc_w, fc_b, pr_w, pr_b = self._stacked()
        ct = chunk_type
        h = torch.baddbmm(fc_b[ct][:, None], xb.view(g, c, c_dim), fc_w[ct].transpose(1, 2))  # (G, c, H)
        y = torch.baddbmm(pr_b[ct][:, None], F.gelu(h), pr_w[ct].transpose(1, 2))  # (G, c, C)
        return y.reshape(g * c, c_dim).index_select(0, dest)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on for its device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def small_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` for (..., M, K) @ (..., K, N); under ``torch.compile``, a tiny one (K <= 8, or
    N <= 8 with M N <= 64) is written as a broadcast product summed over K.

    Why: batched GEMMs this small (the few new slots of a rollout step, the beams' own tokens) run as
    cuBLAS gemv kernels far below bandwidth, one launch each; as a reduction, inductor fuses them with
    the masking and softmax around them. Eager keeps ``matmul`` (no materialised broadcast). Sums in
    float32; the result has the dtype ``matmul`` would give (the autocast dtype when autocast is on).
    """
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if not torch.compiler.is_compiling() or (k > 8 and (n > 8 or m * n > 64)):
        return torch.matmul(a, b)
    dt = (
        _compute_dtype(a)
        if torch.is_autocast_enabled(a.device.type)
        else torch.promote_types(a.dtype, b.dtype)
    )
    # matmul under autocast rounds its inputs to the autocast dtype first: the same rounding here
    prod = a.to(dt).float()[..., :, :, None] * b.to(dt).float()[..., None, :, :]  # (..., M, K, N)
    return prod.sum(-2).to(dt)


def split_attention(
    q: Tensor, k1: Tensor, v1: Tensor, mask1: Tensor, k2: Tensor, v2: Tensor, mask2: Tensor
) -> Tensor:
    """Softmax attention of ``q`` over the keys ``[k1; k2]`` without concatenating them.

    q (B, H, Tq, hd), k1/v1 (B, H, T1, hd), k2/v2 (B, H, T2, hd); masks broadcastable to (B, H, Tq, T1)
    and (B, H, Tq, T2), True = may attend. Equals ``scaled_dot_product_attention(q, cat(k), cat(v),
    attn_mask=cat(mask))`` up to rounding; scores and softmax in float32. Every query must see a key.
    """
    scale = q.shape[-1] ** -0.5
    s1 = torch.matmul(q, k1.transpose(-1, -2)).float() * scale  # (B, H, Tq, T1)
    s2 = small_matmul(q, k2.transpose(-1, -2)).float() * scale  # (B, H, Tq, T2)
    s1 = s1.masked_fill(~mask1, float("-inf"))
    s2 = s2.masked_fill(~mask2, float("-inf"))
    p = torch.cat([s1, s2], -1).softmax(-1)  # (B, H, Tq, T1 + T2): small (Tq new queries)
    t1 = s1.shape[-1]
    dt = v1.dtype
    return torch.matmul(p[..., :t1].to(dt), v1) + small_matmul(p[..., t1:].to(dt), v2)


class LayerCache(NamedTuple):
    k: Tensor  # (B, H, T, hd)
    v: Tensor  # (B, H, T, hd)


class HSTUBlock(nn.Module):
    """Pre-norm block: softmax attention gated element-wise by silu(U) (HSTU), then a typed FFN."""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        n_ln = NUM_TYPES if cfg.token_aware_ln else 1
        n_ffn = NUM_TYPES if cfg.token_aware_ffn else 1
        self.n_heads = cfg.n_heads
        self.ln1 = TypedLayerNorm(cfg.d_model, n_ln)
        self.qkvu = nn.Linear(cfg.d_model, 4 * cfg.d_model)  # Q, K, V and the gate U in one matmul
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = TypedLayerNorm(cfg.d_model, n_ln)
        self.ffn = TypedFFN(cfg.d_model, cfg.ffn_mult * cfg.d_model, n_ffn)

    def forward(
        self,
        x: Tensor,
        type_ids: Tensor,
        mask: Tensor,
        past: LayerCache | None = None,
        segments: Segments | None = None,
    ) -> tuple[Tensor, LayerCache]:
        """x (B, Tq, C), type_ids (B, Tq), mask (B, Tq, Tpast + Tq) bool -> (B, Tq, C), this layer's K/V.
        ``segments``: ``type_segments(type_ids)`` when the caller has it (``TypedFFN.forward``)."""
        b, tq, c = x.shape
        h = self.n_heads
        q, k, v, u = self.qkvu(self.ln1(x, type_ids, segments)).split(c, dim=2)  # 4 x (B, Tq, C)
        q, k, v = (z.view(b, tq, h, c // h).transpose(1, 2) for z in (q, k, v))  # (B, H, Tq, hd)
        if past is not None:
            k = torch.cat([past.k, k], 2)  # (B, H, T, hd)
            v = torch.cat([past.v, v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, H, Tq, hd)
        a = a.transpose(1, 2).reshape(b, tq, c)  # (B, Tq, C)
        x = x + self.out(a * F.silu(u))  # HSTU: the fourth projection gates the attention output
        x = x + self.ffn(self.ln2(x, type_ids, segments), type_ids, segments)
        return x, LayerCache(k, v)

    def forward_append(
        self, x: Tensor, type_ids: Tensor, mask: Tensor, past: LayerCache
    ) -> tuple[Tensor, LayerCache]:
        """``forward`` with a cache, without concatenating it: returns the K/V of the new slots only.

        x (B, Tq, C), mask (B, Tq, Tpast + Tq) -> (B, Tq, C), ``LayerCache`` of (B, H, Tq, hd).
        """
        b, tq, c = x.shape
        h = self.n_heads
        q, k, v, u = self.qkvu(self.ln1(x, type_ids)).split(c, dim=2)  # 4 x (B, Tq, C)
        q, k, v = (z.view(b, tq, h, c // h).transpose(1, 2) for z in (q, k, v))  # (B, H, Tq, hd)
        tp = past.k.shape[2]
        m = mask[:, None]  # (B, 1, Tq, T)
        a = split_attention(q, past.k, past.v, m[..., :tp], k, v, m[..., tp:])  # (B, H, Tq, hd)
        a = a.transpose(1, 2).reshape(b, tq, c)
        x = x + self.out(a * F.silu(u))
        x = x + self.ffn(self.ln2(x, type_ids), type_ids)
        return x, LayerCache(k, v)


class KVCache(NamedTuple):
    """Everything the incremental path needs about the slots already processed."""

    layers: list[LayerCache]  # one per block application (MoR applications count separately)
    type_ids: Tensor  # (B, T) int64
    padding_mask: Tensor  # (B, T) bool

    @property
    def length(self) -> int:
        return self.type_ids.shape[1]


class HSDOutput(NamedTuple):
    hidden: Tensor  # (B, Tq, C) intent embeddings of the (new) slots
    cache: KVCache  # cache covering every slot seen so far


class HSD(nn.Module):
    """Token embedding + HSTU blocks (+ optional Mixture-of-Recursions) -> intent embeddings."""

    bag_embed: str = "eager"
    """class default, where ``embed`` sums the small tables by ``table_embedding`` (one bag) rather than by
    ``table_lookups`` (the reference): ``eager`` (in eager execution only; compiled, the lookups), ``always`` or
    ``never`` (``bench_rl_iteration --embed``'s A/B)"""

    def __init__(self, cfg: GPRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.code_emb = nn.ModuleList(nn.Embedding(k, d) for k in cfg.level_sizes)  # one table per level
        self.item_emb = nn.Embedding(cfg.num_items, d) if cfg.num_items else None
        self.event_emb = nn.Embedding(NUM_EVENTS, d)
        self.dense = nn.Linear(cfg.dense_dim, d, bias=False)  # no bias: zero rows (O/I/pad) embed to 0
        self.type_emb = nn.Embedding(NUM_TYPES, d)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        starts = torch.tensor([0] + [e.num_embeddings for e in self.bag_tables()[:-1]]).cumsum(0)
        self.register_buffer("bag_starts", starts, persistent=False)  # each table's first row in the bag
        n_plain = cfg.n_layers - 1 if cfg.mixture_of_recursions else cfg.n_layers
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(n_plain))
        if cfg.mixture_of_recursions:
            self.shared = HSTUBlock(cfg)
            self.router = nn.Linear(d, cfg.max_recursions)  # logits over depth 1..R
        self.ln_f = nn.LayerNorm(d)

    def code_embedding(self, codes: Tensor) -> Tensor:
        """(..., L') codes, -1 = none -> (..., C) sum of per-level code embeddings (0 where no code)."""
        out = 0
        for lvl, emb in enumerate(self.code_emb):
            c = codes[..., lvl]
            out = out + emb(c.clamp_min(0)) * (c >= 0)[..., None]
        return out

    def embed(self, tokens: TokenBatch) -> Tensor:
        """TokenBatch -> (B, T, C) input embeddings."""
        f = tokens.dense_features.shape[-1]
        if f != self.cfg.dense_dim:  # a shape, not a value: no host sync
            layout = "with" if self.cfg.platform_features else "without"
            market = "with" if self.cfg.market_features else "without"
            raise ValueError(
                f"tokens have {f} dense feature columns, the model reads dense_dim={self.cfg.dense_dim} "
                f"(trained {layout} platform features, {market} market features): build the tokens with "
                "features= and market= matching GPRConfig.platform_features and .market_features "
                "(gpr_sim.schema.dense_dim)"
            )
        # compiled, the lookups: Inductor fuses each with its mask and the sum, and writes their backward as Triton
        # scatter-adds, where the bag is an opaque kernel whose backward sorts every index (measured on an H100 in
        # the compiled update: the bag's gathers and scatters 0.17 s per iteration, the lookups' 0.004 s;
        # RESULTS "The cuts on an H100"); eager, the bag moves a third of the bytes
        if self.bag_embed not in ("eager", "always", "never"):
            raise ValueError(f"HSD.bag_embed={self.bag_embed!r} is invalid: expected eager, always or never")
        bag = self.bag_embed == "always" or (self.bag_embed == "eager" and not torch.compiler.is_compiling())
        x = self.table_embedding(tokens) if bag else self.table_lookups(tokens)  # (B, T, C)
        if self.item_emb is not None:
            ids = tokens.token_ids
            has_item = (ids >= 0) & (tokens.semantic_codes[..., 0] >= 0)  # O/I only, not the U's user id
            x = x + self.item_emb(ids.clamp_min(0)) * has_item[..., None]
        return x + self.dense(tokens.dense_features)  # U/E (+ I with platform features): zeros elsewhere

    def bag_tables(self) -> list[nn.Embedding]:
        """The tables ``table_embedding`` concatenates, in the order of its id columns and ``bag_starts``."""
        return [*self.code_emb, self.event_emb, self.type_emb, self.pos_emb]

    def table_lookups(self, tokens: TokenBatch) -> Tensor:
        """``table_embedding``'s reference: a lookup per table, masked, summed."""
        event = self.event_emb(tokens.event_ids) * (tokens.type_ids == TYPE_I)[..., None]  # I: funnel event
        codes = self.code_embedding(tokens.semantic_codes)  # O/I: item path
        return codes + event + self.type_emb(tokens.type_ids) + self.pos_emb(tokens.positions)

    def table_embedding(self, tokens: TokenBatch) -> Tensor:
        """(B, T, C): each level's code embedding (O/I; 0 where no code), the funnel event's (I only), the type's
        and the position's, summed.

        One ``embedding_bag`` over the small tables concatenated: it reads each token's rows and writes (B, T, C)
        once, where a lookup per table, its mask and the sum would write it three times per table (forward and
        backward; ``benchmarks/roofline_rl_iteration.py``).
        """
        codes = tokens.semantic_codes[..., : len(self.code_emb)]
        ids = torch.cat(
            [
                codes.clamp_min(0),
                tokens.event_ids[..., None],
                tokens.type_ids[..., None],
                tokens.positions[..., None],
            ],
            -1,
        )  # (B, T, L + 3)
        table = torch.cat([e.weight for e in self.bag_tables()])
        used = torch.cat([codes >= 0, (tokens.type_ids == TYPE_I)[..., None]], -1).to(table.dtype)
        weights = torch.cat([used, used.new_ones(*used.shape[:-1], 2)], -1)
        k = ids.shape[-1]
        out = F.embedding_bag(
            (ids + self.bag_starts).view(-1, k), table, per_sample_weights=weights.view(-1, k), mode="sum"
        )
        return out.view(*ids.shape[:-1], -1)

    def router_gates(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, R) gates in {0, 1} forward, soft backward (straight-through).

        Gate r is 1 where the token's routed depth (argmax of the router) is >= r + 1; its soft twin is
        the router probability of a depth >= r + 1, which carries the gradient to the router.
        """
        p = self.router(x).softmax(-1)  # (B, T, R) probability of depth 1..R
        soft = p.flip(-1).cumsum(-1).flip(-1)  # (B, T, R) P(depth >= r + 1)
        r = torch.arange(p.shape[-1], device=x.device)
        hard = (r <= p.argmax(-1, keepdim=True)).to(x.dtype)  # (B, T, R)
        return hard + soft - soft.detach()

    def forward(
        self, tokens: TokenBatch, cache: KVCache | None = None, segments: Segments | None = None
    ) -> HSDOutput:
        """Encode ``tokens`` (the full sequence, or slots appended after ``cache``).

        ``segments``: ``type_segments(tokens.type_ids)``, when the caller has computed it (once for many
        forwards): the typed FFN then needs no sort (``TypedFFN.forward``). None: the types are read per token.

        Returns:
            ``HSDOutput(hidden (B, Tq, C), cache)``; the request representation is ``hidden[:, -1]``
            when the last slot is E (the schema layout).
        """
        if cache is None:
            type_ids, pad, start, past = tokens.type_ids, tokens.padding_mask, 0, None
        else:
            type_ids = torch.cat([cache.type_ids, tokens.type_ids], 1)  # (B, T)
            pad = torch.cat([cache.padding_mask, tokens.padding_mask], 1)
            start, past = cache.length, cache.layers
        mask = hybrid_mask_rows(type_ids, pad, start, hybrid=self.cfg.hybrid_attention)  # (B, Tq, T)
        x = to_stream(self.embed(tokens))  # (B, Tq, C), the stream in the compute dtype under autocast
        tq_types = tokens.type_ids
        layers: list[LayerCache] = []
        for block in self.blocks:
            x, kv = block(x, tq_types, mask, None if past is None else past[len(layers)], segments)
            layers.append(kv)
        if self.cfg.mixture_of_recursions:
            gates = self.router_gates(x)  # routed once, on the input to the shared block
            for r in range(self.cfg.max_recursions):
                y, kv = self.shared(x, tq_types, mask, None if past is None else past[len(layers)], segments)
                layers.append(kv)
                g = gates[..., r : r + 1]  # (B, Tq, 1): tokens routed shallower keep x unchanged
                x = x + g * (y - x)
        return HSDOutput(self.ln_f(x), KVCache(layers, type_ids, pad))

    def append(self, tokens: TokenBatch, cache: KVCache) -> HSDOutput:
        """Slots appended after ``cache`` (I/E tokens only), reading the cache without copying it.

        Same hidden states as ``forward(tokens, cache)`` (up to rounding), but the returned cache holds
        the new slots only: ``layers`` (B, H, Tq, hd) each, ``type_ids``/``padding_mask`` (B, Tq). The
        caller stores them (the module docstring's rollout step). Mixture-of-Recursions is supported.
        """
        type_ids = torch.cat([cache.type_ids, tokens.type_ids], 1)  # (B, T)
        pad = torch.cat([cache.padding_mask, tokens.padding_mask], 1)
        mask = hybrid_mask_rows(type_ids, pad, cache.length, hybrid=self.cfg.hybrid_attention)  # (B, Tq, T)
        x = to_stream(self.embed(tokens))  # (B, Tq, C), the stream in the compute dtype under autocast
        tq_types = tokens.type_ids
        layers: list[LayerCache] = []
        for block in self.blocks:
            x, kv = block.forward_append(x, tq_types, mask, cache.layers[len(layers)])
            layers.append(kv)
        if self.cfg.mixture_of_recursions:
            gates = self.router_gates(x)
            for r in range(self.cfg.max_recursions):
                y, kv = self.shared.forward_append(x, tq_types, mask, cache.layers[len(layers)])
                layers.append(kv)
                g = gates[..., r : r + 1]
                x = x + g * (y - x)
        return HSDOutput(self.ln_f(x), KVCache(layers, tokens.type_ids, tokens.padding_mask))
