"""The KV-cached incremental decoder: one rollout step of B users on per-user caches.

A request is the schema layout ``[U | O x Ho | I x Hi | E]`` (T slots, ``gpr_sim.schema``). Re-encoding
all T slots for every decision repeats the whole HSD; here each user's prefix is encoded once
(``IncrementalDecoder.prefill``) and a step then processes only the request's new tokens:

1. token update (``new_request_tokens``): ``new_tokens - 1`` I tokens (the ad shown at the last decision,
   with its funnel events) and one new E token (the next request's context features);
2. ``HSD.append`` of those tokens against the cached K/V, read once and never copied. Exact: the old E
   slot is marked padding at prefill, so no later query reads it, and no U/O/I token attends to E, so the
   step equals the full forward of ``[U | O | I ... I_new | E_new]`` (``gpr_sim.model.hsd``'s docstring);
3. thinking from the cached online-softmax state (``Thinking.forward_partial``: the queries are
   parameters, so the prefix folds into O(K d) numbers per user) + the refiner from a fixed per-user noise;
4. trie-constrained beam search with the cached PTD (``request_major_step``): the context K/V once per
   request, only the beams' generated tokens re-decoded;
5. HTE values of every prefix of the top-K paths; the new slots' K/V go to a tail buffer and the best
   path (the ad shown) is written back into the state as the next step's I token.

Usage (shapes on the right)::

    dec = IncrementalDecoder(model, trie, mode="fused", new_tokens=2)
    st = dec.prefill(tokens, codes, items, events, context, noise)  # tokens (B, T); state on tokens' device
    out = dec(st, beam=8, top_k=8)   # out.items (B, 8), out.codes (B, 8, L'), out.log_prob, out.values
    st.events.copy_(events_next)     # (B, new_tokens - 1) the caller's next inputs, written in place
    st.context.copy_(context_next)   # (B, F)

Modes (``IncrementalDecoder.MODES``):

| mode | what runs compiled | why |
|---|---|---|
| ``eager`` | nothing | the reference; prefill and the one-user loop |
| ``compiled`` | HSD append + thinking, refiner + PTD context K/V, the level step, HTE values | model FLOPs fused; beam bookkeeping (top-k, trie gathers) stays eager |
| ``fused`` | the whole step, beam search and state update included (``fullgraph=True``) | one graph: no Python between kernels |
| ``graphs`` | ``fused``, captured once per (state, beam, top_k) into a CUDA graph and replayed | no per-kernel launch cost (CUDA only) |

The cached PTD is one home for every decoder of the generator (module functions, used here, by the RL
rollout's K sampled paths, by the served policy's beam search and by the RL update's teacher-forced pass):

| function | what |
|---|---|
| ``head_context_kv(model, ctx)`` | head 0's PTD context K/V, once per request |
| ``request_major_step(level, kv, B)`` | a ``StepFn`` reading those K/V per request for rows laid out ``arange(B).repeat_interleave(w)`` (``beam_search``'s and ``sample_paths``' layout) |
| ``path_log_prob(model, ctx, paths, legal)`` | teacher-forced (B, K, L') log-probs of K paths per request, context decoded once per request |

Not done: the cache does not grow. Every step appends to the prefix encoded at prefill (the tail buffers
are rewritten): the steady state of a history of T slots. A rollout that keeps the shown ads in the
history needs a growing (or ring) buffer, or a new prefill. New O (organic) or U tokens cannot be
appended exactly (U/O attend to each other both ways): they need a new prefill too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpr_sim.decoding import StepFn, beam_search
from gpr_sim.model.gpr import GPRModel
from gpr_sim.model.hsd import KVCache, LayerCache, type_segments
from gpr_sim.model.ptd import ThinkingPartial
from gpr_sim.schema import TYPE_E, TYPE_I, TokenBatch
from gpr_sim.tokenizer.trie import PrefixTrie


def head_context_kv(model: GPRModel, context: Tensor) -> list[tuple[Tensor, Tensor]]:
    """PTD context (B, Cc, C) -> per decoder block the K/V (B, H, Cc, hd) of head 0's context tokens.

    Computed once per request: the context tokens attend to each other only, so their K/V do not depend
    on the decoded prefix (``PTD.context_kv``).
    """
    return model.ptd.context_kv(model.head_context(context, 0))


def request_major_step(level_fn, context_kv: list[tuple[Tensor, Tensor]], batch_size: int) -> StepFn:
    """A ``gpr_sim.decoding`` step function over cached context K/V of ``batch_size`` requests.

    Valid only for callers whose rows are ``arange(B).repeat_interleave(w)`` at every level (``beam_search``
    and ``sample_paths`` both lay them out so): request b's K/V are then read once for its w prefixes
    instead of gathered per prefix (``PTD.level_logits_cached``'s ``beams``); ``row`` is not read.

    Args:
        level_fn: ``model.ptd.level_logits_cached`` or a compiled version of it.
        context_kv: from ``head_context_kv``.
        batch_size: B.
    """

    def step(row: Tensor, prefix: Tensor) -> Tensor:
        return level_fn(context_kv, row, prefix, beams=prefix.shape[0] // batch_size)

    return step


def path_log_prob(
    model: GPRModel, context: Tensor, paths: Tensor, legal: list[Tensor] | None = None
) -> Tensor:
    """Teacher-forced per-level log-probs of K paths per request, the context decoded once per request.

    Equals ``model.log_prob(context.repeat_interleave(K, 0), paths.flatten(0, 1), masks)`` up to rounding
    (forward and backward), with the PTD run over the L' generated tokens of each path against head 0's
    context K/V (``PTD.log_prob_cached``) instead of over Cc + L' tokens per path.

    Args:
        context: (B, Cc, C) PTD context.
        paths: (B, K, L') int64 paths (in range).
        legal: None, or L' masks (B, K, K_l) bool of the legal codes.

    Returns:
        (B, K, L') log P(z_l | context, z_<l) under head 0, renormalised over the legal codes.
    """
    b, k, length = paths.shape
    masks = None if legal is None else [m.flatten(0, 1) for m in legal]
    kv = head_context_kv(model, context)
    return model.ptd.log_prob_cached(kv, paths.flatten(0, 1), masks, beams=k).view(b, k, length)


@dataclass
class IncrementalState:
    """Per-user state of the incremental step for B users, all on one device.

    The step updates it in place (``tail``, ``codes``, ``items``), so a captured CUDA graph keeps
    reading the same tensors; the caller writes the next request's ``events`` and ``context`` in place.
    """

    layers: list[LayerCache]  # HSD K/V of the prefix per block application, (B, H, T, hd) contiguous
    think: ThinkingPartial  # the thinking attention's online-softmax state over the prefix, O(K d) per user
    type_ids: Tensor  # (B, T) int64 slot types of the prefix
    padding_mask: Tensor  # (B, T) bool, True = ignore; the old E slot (last) is marked padding
    next_pos: Tensor  # (B,) int64 position of the first appended token (the old E's position)
    codes: Tensor  # (B, L') int64 path of the ad shown at the last decision: the next I token(s)
    items: Tensor  # (B,) int64 its item id
    events: Tensor  # (B, new_tokens - 1) int64 funnel events of the appended I tokens
    context: Tensor  # (B, F) float32 dense features of the appended E token
    noise: Tensor  # (B, C) float32 the refiner's starting noise, the same every step
    tail: list[LayerCache]  # the new slots' K/V per block, (B, H, new_tokens, hd): rewritten every step

    def rows(self, sl: slice) -> IncrementalState:
        """Users ``sl`` of the batch (views: in-place updates reach this state)."""

        def cut(x):
            if isinstance(x, Tensor):
                return x[sl]
            if isinstance(x, (LayerCache, ThinkingPartial)):
                return type(x)(*map(cut, x))
            if isinstance(x, list):
                return [cut(y) for y in x]
            return x

        return IncrementalState(**{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)})


class StepOutput(NamedTuple):
    """One decision per user, best path first (``gpr_sim.decoding.BeamResult`` plus HTE values).

    In mode ``graphs`` these are the graph's static outputs: the next replay on the same state
    overwrites them (copy what must outlive the step).
    """

    items: Tensor  # (B, top_k) int64 item ids, -1 past the legal items of a row
    codes: Tensor  # (B, top_k, L') int64 paths, -1 rows for missing items
    log_prob: Tensor  # (B, top_k) float32 summed legal-renormalised log-probabilities, -inf if missing
    values: Tensor  # (B, top_k, L' + 1) HTE values of every prefix of each path (missing: of codes 0)


class IncrementalDecoder:
    """One rollout step per user: token update -> HSD append on the KV cache -> thinking (cached state)
    + refiner -> trie-constrained beam search with the cached PTD -> HTE values (module docstring).

    Args:
        model: a ``GPRModel`` with thinking, refining and the HTE on (the default config), in eval mode.
        trie: the decodable items (beam search never leaves it).
        mode: one of ``MODES`` (module docstring table).
        new_tokens: tokens appended per step: ``new_tokens - 1`` I tokens of the shown ad + the E token.
        compile_mode: ``torch.compile``'s mode for the fused step (e.g. ``max-autotune-no-cudagraphs``:
            Triton GEMM templates with fused epilogues); None = torch's default.
        ad_lookup: full paths (..., L') -> (..., F_ad) candidate-ad features for the HTE
            (``gpr_sim.model.hte.path_ad_features`` bound to a tokenizer and features), with
            ``GPRConfig.hte_ad_features``; None = none.
    """

    MODES = ("eager", "compiled", "fused", "graphs")

    def __init__(
        self,
        model: GPRModel,
        trie: PrefixTrie,
        mode: str,
        new_tokens: int,
        compile_mode: str | None = None,
        ad_lookup: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1 (the E token), got {new_tokens}")
        cfg = model.cfg
        if not (cfg.thinking and cfg.refining and cfg.hte):
            raise ValueError(
                "the incremental decoder needs thinking, refining and the HTE on (the default config)"
            )
        self.model, self.trie, self.new_tokens, self.mode = model, trie, new_tokens, mode
        self.ad_lookup = ad_lookup

        def compiled(fn):  # the model parts of mode "compiled": shapes are static per (chunk, beam, level)
            return torch.compile(fn, dynamic=False) if mode == "compiled" else fn

        self._hsd_think = compiled(self.hsd_think)
        self._context = compiled(self.context)
        self._level = compiled(model.ptd.level_logits_cached)
        self._values = compiled(model.path_values)
        self._run = self._step
        if mode in ("fused", "graphs"):
            self._run = torch.compile(self._step, dynamic=False, fullgraph=True, mode=compile_mode)
        self._graphs: dict[tuple, tuple] = {}  # (state, rows, beam, top_k) -> (graph, static StepOutput)
        self._pool = None

    # -- the parts of a step ------------------------------------------------------------------------
    def hsd_think(
        self,
        layers: list[LayerCache],
        type_ids: Tensor,
        padding_mask: Tensor,
        think: ThinkingPartial,
        tokens: TokenBatch,
    ) -> tuple[Tensor, list[LayerCache]]:
        """HSD append of ``tokens`` (B, n) on the cached prefix + thinking over prefix and new slots.

        Returns:
            thinking tokens (B, K, C) (== ``Thinking.forward`` on the full sequence up to rounding) and
            the new slots' K/V per block, (B, H, n, hd) each.
        """
        out = self.model.hsd.append(tokens, KVCache(layers, type_ids, padding_mask))  # hidden (B, n, C)
        th = self.model.ptd.thinking.forward_partial(think, out.hidden, tokens.padding_mask)  # (B, K, C)
        return th, out.cache.layers

    def context(self, thinking: Tensor, noise: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Thinking tokens (B, K, C) -> PTD context (B, K + 1, C) (refine token appended; ==
        ``PTD.context(..., noise=noise)``) and the PTD context K/V (== ``beam_fns(ctx, cached=True)``'s)."""
        model = self.model
        refine = model.ptd.refiner.sample(thinking.mean(1), noise=noise)  # (B, C)
        ctx = torch.cat([thinking, refine[:, None].to(thinking.dtype)], 1)  # (B, K + 1, C)
        return ctx, head_context_kv(model, ctx)

    def new_request_tokens(self, st: IncrementalState) -> TokenBatch:
        """Token update: the last decision's shown ad as ``new_tokens - 1`` I tokens + the new E token.

        Returns a (B, new_tokens) ``TokenBatch`` whose positions continue from the old E's position
        (positions count real tokens, and the old E slot is padding from now on).
        """
        b, dev = st.codes.shape[0], st.codes.device
        n_i, n = self.new_tokens - 1, self.new_tokens
        is_i = torch.arange(n, device=dev) < n_i  # (n,): I slots first, E last (the schema order)
        type_ids = torch.where(is_i, TYPE_I, TYPE_E).expand(b, n)  # (B, n)
        codes = torch.where(is_i[None, :, None], st.codes[:, None, :], -1)  # (B, n, L'), E: no code
        token_ids = torch.where(is_i[None], st.items[:, None], -1)  # (B, n)
        positions = st.next_pos[:, None] + torch.arange(n, device=dev)  # (B, n)
        events = F.pad(st.events, (0, 1))  # (B, n), E: event 0
        dense = torch.zeros(b, n, st.context.shape[1], device=dev)  # (B, n, F): only E has features
        dense[:, -1] = st.context
        pad = torch.zeros(b, n, dtype=torch.bool, device=dev)
        return TokenBatch(token_ids, type_ids, positions, pad, codes, events, dense)

    # -- prefill -------------------------------------------------------------------------------------
    def prefill(
        self,
        tokens: TokenBatch,
        codes: Tensor,
        items: Tensor,
        events: Tensor,
        context: Tensor,
        noise: Tensor,
        sub: int = 4096,
    ) -> IncrementalState:
        """Encode each user's prefix once (not part of the step): the state the steps start from.

        Runs the HSD over ``sub`` users at a time (bounded activation memory) into preallocated state.

        Args:
            tokens: (B, T) requests in the schema layout, E last in every row.
            codes: (B, L') int64 path of the ad shown at the last decision (the first step's I token).
            items: (B,) int64 its item id.
            events: (B, new_tokens - 1) int64 funnel events of the first step's I tokens (1 to 3).
            context: (B, F) dense features of the first step's E token.
            noise: (B, C) the refiner's starting noise (kept: every step refines from the same draw).
            sub: users per HSD pass.

        Returns:
            ``IncrementalState`` on the tokens' device; the five inputs are copied into it.
        """
        model, dev = self.model, tokens.type_ids.device
        cfg = model.cfg
        b, t = tokens.type_ids.shape
        want = {
            "codes": (b, cfg.path_len),
            "items": (b,),
            "events": (b, self.new_tokens - 1),
            "context": (b, cfg.dense_dim),
            "noise": (b, cfg.d_model),
        }
        for name, x in zip(want, (codes, items, events, context, noise), strict=True):
            if tuple(x.shape) != want[name]:
                raise ValueError(f"{name} must be {want[name]}, got {tuple(x.shape)}")
        if t + self.new_tokens - 1 > cfg.max_len:  # the appended positions run up to T - 1 + new_tokens - 1
            raise ValueError(
                f"T={t} + new_tokens={self.new_tokens} - 1 exceeds GPRConfig.max_len={cfg.max_len}"
            )
        if sub < 1:
            raise ValueError(f"sub must be >= 1, got {sub}")
        if not bool((tokens.type_ids[:, -1] == TYPE_E).all()):
            raise ValueError("prefill needs the schema layout: the last slot of every row must be E")
        pad = tokens.padding_mask.clone()
        pad[:, -1] = True  # the old E slot: seen by no later query
        layers = think = None
        segments = type_segments(tokens.type_ids)  # the slot layout, read once: the typed FFN needs no sort
        for lo in range(0, b, sub):
            sl = slice(lo, min(b, lo + sub))
            out = model.hsd(TokenBatch(*(x[sl] for x in tokens)), segments=segments)
            part = model.ptd.thinking.partial(out.hidden, pad[sl])
            if layers is None:  # allocate once, from the first sub-batch's shapes and dtypes
                layers = [
                    LayerCache(*(torch.empty(b, *z.shape[1:], dtype=z.dtype, device=dev) for z in c))
                    for c in out.cache.layers
                ]
                think = ThinkingPartial(
                    *(torch.empty(b, *z.shape[1:], dtype=z.dtype, device=dev) for z in part)
                )
            for dst, src in zip(layers, out.cache.layers, strict=True):
                dst.k[sl].copy_(src.k)
                dst.v[sl].copy_(src.v)
            for dst, src in zip(think, part, strict=True):
                dst[sl].copy_(src)
            del out, part
        kdt, (h, hd) = layers[0].k.dtype, layers[0].k.shape[1::2]
        return IncrementalState(
            layers=layers,
            think=think,
            type_ids=tokens.type_ids.contiguous(),
            padding_mask=pad,
            next_pos=tokens.positions[:, -1].clone(),
            codes=codes.clone(),
            items=items.clone(),
            events=events.clone(),
            context=context.clone(),
            noise=noise.clone(),
            tail=[
                LayerCache(
                    torch.empty(b, h, self.new_tokens, hd, device=dev, dtype=kdt),
                    torch.empty(b, h, self.new_tokens, hd, device=dev, dtype=kdt),
                )
                for _ in layers
            ],
        )

    # -- the step ------------------------------------------------------------------------------------
    def _step(self, st: IncrementalState, beam: int, top_k: int) -> StepOutput:
        """The step on ``st`` in place (tail K/V, shown ad): the body that ``fused``/``graphs`` compile."""
        tok = self.new_request_tokens(st)  # (B, n)
        th, new_kv = self._hsd_think(st.layers, st.type_ids, st.padding_mask, st.think, tok)
        for buf, kv in zip(st.tail, new_kv, strict=True):  # store the new slots (a ring buffer's write)
            buf.k.copy_(kv.k)
            buf.v.copy_(kv.v)
        ctx, kv = self._context(th, st.noise)  # (B, K + 1, C), per PTD block (B, H, K + 1, hd) x 2
        b = ctx.shape[0]
        res = beam_search(
            request_major_step(self._level, kv, b),  # the context K/V read per request, not per beam
            self.trie,
            batch_size=b,
            beam_width=beam,
            top_k=top_k,
        )
        feats = None if self.ad_lookup is None else self.ad_lookup(res.codes)  # (B, top_k, F_ad)
        vals = self._values(ctx, res.codes.clamp_min(0), feats)  # (B, top_k, L' + 1)
        st.codes.copy_(res.codes[:, 0].clamp_min(0))  # the shown ad: next step's I token
        st.items.copy_(res.items[:, 0].clamp_min(0))
        return StepOutput(res.items, res.codes, res.log_prob, vals)

    def __call__(self, st: IncrementalState, beam: int, top_k: int) -> StepOutput:
        """One step of every user in ``st`` (updated in place): beam width ``beam``, ``top_k`` items each."""
        if self.mode != "graphs":
            return self._run(st, beam, top_k)
        key = (st.codes.data_ptr(), st.codes.shape[0], beam, top_k)  # a graph is bound to its tensors
        if key not in self._graphs:
            self._graphs[key] = self._capture(st, beam, top_k)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, st: IncrementalState, beam: int, top_k: int) -> tuple:
        """Warm the fused step up on a side stream, then capture it on ``st``'s (static) tensors.

        The warm-up runs really execute the step, which moves the shown ad (``codes``, ``items``: the only
        state a step carries to the next; ``tail`` is rewritten from them): both are restored afterwards,
        so the first replay decides the same step an eager call would.
        """
        if st.codes.device.type != "cuda":
            raise ValueError("mode 'graphs' needs a CUDA device")
        codes, items = st.codes.clone(), st.items.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(st, beam, top_k)
        torch.cuda.current_stream().wait_stream(side)
        st.codes.copy_(codes)
        st.items.copy_(items)
        if self._pool is None:  # one pool for every graph: they replay one at a time, outputs read at once
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(st, beam, top_k)
        return graph, out

    def release(self) -> None:
        """Drop the captured graphs and their memory pool (before other shapes are run)."""
        self._graphs.clear()
        self._pool = None  # a fresh pool: capturing into one whose graphs were freed trips the allocator
