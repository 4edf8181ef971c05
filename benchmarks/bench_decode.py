"""Decisions per second of GPR decoding: HSD forward + PTD context + trie-constrained beam search.

    python benchmarks/bench_decode.py --device cpu --sizes 8 --beams 4 --seq-len 16 --items 2000   # smoke
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --sizes 1024,16384,131072 --beams 8,40 --compile
    python benchmarks/bench_decode.py ... --mode full,incremental --new-tokens 2   # both decode paths

One decision = one request decoded to its top-K items (``--top-k``, capped at the beam width) by
``beam_search`` over a ``PrefixTrie`` of ``--items`` random paths with ``--levels`` codes per level, with
the model's own ``beam_fns`` (the production path of ``agents.policies.gpr``). Requests are synthetic
``TokenBatch`` rows in the schema layout ``[U | O x Ho | I x Hi | E]`` with T = ``--seq-len`` slots
(Ho = Hi = (T - 2) / 2, ~10% of history slots padded), built before the clock starts. N requests run
in micro-batches of ``--chunk`` (activation memory grows with the chunk, not with N).

Decode paths (``--mode``, the row's ``decode`` key; ``mode`` stays eager/compiled):
- ``full``: every decision re-encodes the whole T-token request (as ``agents.policies.gpr`` does).
- ``incremental``: a rollout step on a per-user KV cache (``gpr_sim.model.IncrementalDecoder``; the step's
  parts and why appending is exact: ``gpr_sim.model.incremental``). The prefix (the schema layout, T tokens)
  is encoded once per user ("prefill", timed apart, in ``prefill``) with random first-step inputs
  (``step_inputs``: the shown ad, its ``--new-tokens`` - 1 funnel events, the new E token's context); each
  step appends ``--new-tokens`` tokens to the same T-token prefix (steady state at history T) and feeds the
  ad it shows into the next step.
  Two chunk states of ``--inc-chunk`` users are cycled over N (as ``full`` cycles two token batches);
  ``resident_state_gib`` = N x the state bytes per user is what holding all N users would take.
  No env step unless ``--env-step`` (rows ``incremental+env``).

Rows:
- ``eager`` / ``compiled``: the same decode; ``compiled`` runs the HSD forward and the per-level step
  function (context gather + ``level_logits``) through ``torch.compile``; thinking, the refiner and the
  beam bookkeeping (topk, trie lookups) stay eager. Incremental ``compiled`` compiles the HSD append +
  thinking, the refiner + PTD context K/V, the cached level step and the HTE values.
- ``fused`` / ``graphs`` (incremental, ``--fuse`` or ``--inc-modes``): the whole step as one compiled graph,
  and that graph replayed as a CUDA graph (``IncrementalDecoder.MODES``).
- ``naive``: one request at a time through the same eager model and beam search (incremental: the same
  eager step on one user's state), timed on ``--naive-requests`` requests and extrapolated;
  ``x naive`` = batched / naive decisions per second of the same decode path.
- floor: FLOPs per decision (matmuls of the config, counted as the code runs them, ``decode_cost``)
  over a measured square-matmul rate in the same dtype, and bytes per decision (activations each
  matmul reads and writes, the attention mask, weights once per micro-batch) over a measured copy
  bandwidth; the floor time is the larger of the two. ``of floor`` = achieved / floor decisions per s.
  Incremental (``incremental_cost``): the new tokens through the HSD against the cached K/V (read once:
  ``kv_bytes_per_decision`` = 2 x blocks x T x d x dtype bytes + the thinking state), thinking, refiner,
  cached PTD, HTE values; this mode is bound by the K/V bytes, not FLOPs.
- ``train``: tokens per second of ``model.mtp_loss`` forward + backward on ``--train-batch`` requests.
- ``ffn``: the token-aware FFN implementations (``TypedFFN.impl``) side by side on one micro-batch.

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from gpr_sim.decoding import beam_search  # noqa: E402
from gpr_sim.model import GPRConfig, GPRModel, IncrementalDecoder, IncrementalState  # noqa: E402
from gpr_sim.model.hsd import TypedFFN  # noqa: E402
from gpr_sim.schema import TYPE_E, TYPE_I, TYPE_O, TYPE_U, SchemaConfig, TokenBatch  # noqa: E402
from gpr_sim.tokenizer.trie import PrefixTrie  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- setup ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_tokens(
    b: int, schema: SchemaConfig, cfg: GPRConfig, device: torch.device, seed: int = 0
) -> TokenBatch:
    """Random requests in the schema layout (U, O x Ho, I x Hi, E); ~10% of the history slots padded."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = schema.seq_len
    type_ids = schema.type_ids(device).expand(b, -1)
    item = (type_ids == TYPE_O) | (type_ids == TYPE_I)
    pad = item & (torch.rand(b, t, generator=gen, device=device) < 0.1)
    real = item & ~pad
    codes = torch.stack(
        [torch.randint(0, k, (b, t), generator=gen, device=device) for k in cfg.level_sizes], -1
    ).masked_fill(~real[..., None], -1)  # (B, T, L')
    token_ids = torch.where(real, torch.randint(0, 1 << 20, (b, t), generator=gen, device=device), -1)
    token_ids[:, 0] = torch.randint(0, 1 << 20, (b,), generator=gen, device=device)  # U: user id
    events = torch.where(
        real & (type_ids == TYPE_I), torch.randint(1, 4, (b, t), generator=gen, device=device), 0
    )
    dense = torch.randn(b, t, cfg.dense_dim, generator=gen, device=device)
    dense = dense * ((type_ids == TYPE_U) | (type_ids == TYPE_E))[..., None]
    valid = ~pad
    positions = (torch.cumsum(valid.long(), 1) - 1) * valid
    return TokenBatch(token_ids, type_ids, positions, pad, codes, events, dense)


def make_trie(num_items: int, levels: tuple[int, ...], device: torch.device, seed: int = 0) -> PrefixTrie:
    """Trie of ``num_items`` uniformly random paths (items may share a path, as in a real catalog)."""
    gen = torch.Generator().manual_seed(seed)
    paths = torch.stack([torch.randint(0, k, (num_items,), generator=gen) for k in levels], 1)
    return PrefixTrie(paths.to(device), levels)


# -- cost model -----------------------------------------------------------------------------------
def beam_widths(levels: tuple[int, ...], beam: int) -> list[int]:
    """Beams alive at each level's step: 1 at the root, then min(W, w * K_l)."""
    w, out = 1, []
    for k in levels:
        out.append(w)
        w = min(beam, w * k)
    return out


class _Tally:
    """FLOPs, activation elements (read + written) and weight elements of the matmuls and attention a cost
    function walks through, block by block as the code runs them."""

    def __init__(self, cfg: GPRConfig) -> None:
        self.d, self.h = cfg.d_model, cfg.ffn_mult * cfg.d_model
        self.flops = self.act = 0.0
        self.weights = 0

    def linear(self, m: float, i: int, o: int) -> None:
        self.flops += 2 * m * i * o
        self.act += m * (i + o)
        self.weights += i * o

    def attention(self, tq: float, tk: float, n_seq: float) -> None:  # one sequence set, all heads
        self.flops += n_seq * 4 * tq * tk * self.d  # QK^T and AV
        self.act += n_seq * (2 * tq + 2 * tk) * self.d

    def block(self, m_in: float, m_out: float, qkv: int, tq: float, tk: float, n_seq: float) -> None:
        """A pre-norm block: ``qkv`` x d projections of ``m_in`` rows, attention, output projection and
        FFN of the ``m_out`` rows whose outputs are used."""
        d, h = self.d, self.h
        self.linear(m_in, d, qkv * d)
        self.attention(tq, tk, n_seq)
        self.linear(m_out, d, d)
        self.linear(m_out, d, h)
        self.linear(m_out, h, d)

    def context(self, cfg: GPRConfig, t: float, n_new: float, tk: float) -> int:
        """HSD blocks (``n_new`` queries against ``tk`` keys), thinking over ``t`` slots and the refiner;
        returns Cc, the context tokens (thinking tokens + the refine token)."""
        d = self.d
        for _ in range(cfg.n_layers + (cfg.max_recursions - 1 if cfg.mixture_of_recursions else 0)):
            self.block(n_new, n_new, 4, n_new, tk, 1)
        cc = 0
        if cfg.thinking:
            k = cfg.num_thinking
            self.linear(t, d, 2 * d)
            self.linear(k, d, d)
            self.attention(k, t, 1)
            self.linear(k, d, d)
            self.linear(k, d, self.h)
            self.linear(k, self.h, d)
            cc += k
        else:
            cc += 1
        if cfg.refining:
            for _ in range(cfg.refine_steps):
                self.linear(1, 3 * d, 2 * d)
                self.linear(1, 2 * d, d)
            cc += 1
        return cc


def decode_cost(cfg: GPRConfig, seq_len: int, beam: int, chunk: int, elt: int) -> dict[str, float]:
    """Matmul FLOPs and bytes of one decision, as the code runs it (no KV cache in the PTD).

    ``flops_min`` is the same decision with the PTD context tokens encoded once per request and one new
    token per beam and level (a KV-cached decoder): what a PTD cache would leave.
    """
    d, h, t = cfg.d_model, cfg.ffn_mult * cfg.d_model, seq_len
    c = _Tally(cfg)
    cc = c.context(cfg, t, t, t)  # the whole request re-encoded
    mask_bytes = t * t  # (T, T) bool hybrid mask per request
    hsd_ctx_flops = c.flops
    widths = beam_widths(cfg.level_sizes, beam)
    for lvl, (w, k) in enumerate(zip(widths, cfg.level_sizes, strict=True)):
        s = cc + lvl + 1  # context + BOS + prefix tokens, re-decoded for every beam
        c.act += w * cc * d  # the context gathered per beam
        c.linear(w * cc, d, d)  # MTP head-0 adapter on the gathered context
        for _ in range(cfg.decoder_layers):
            c.block(w * s, w * s, 3, s, s, w)
        c.linear(w, d, k)
    # KV-cached PTD: the context through the decoder once, then one token per beam and level
    ptd_min = 2 * cc * d * d + cfg.decoder_layers * cc * (2 * d * 4 * d + 4 * d * h) + 4 * cc * cc * d
    for lvl, (w, k) in enumerate(zip(widths, cfg.level_sizes, strict=True)):
        ptd_min += w * (cfg.decoder_layers * (2 * d * 4 * d + 4 * d * h + 4 * (cc + lvl + 1) * d) + 2 * d * k)
    bytes_ = elt * c.act + mask_bytes + elt * c.weights / max(chunk, 1)
    return {"flops": c.flops, "flops_min": hsd_ctx_flops + ptd_min, "bytes": bytes_}


def state_bytes_per_user(cfg: GPRConfig, prefix_len: int, elt: int) -> int:
    """Cached bytes per user of the incremental mode: HSD K/V of every block (``elt`` bytes each) + the
    thinking attention's online-softmax state (float32, K (d + 2 H), independent of the prefix length)."""
    n_blocks = cfg.n_layers + (cfg.max_recursions - 1 if cfg.mixture_of_recursions else 0)
    think = 4 * cfg.num_thinking * (cfg.d_model + 2 * cfg.n_heads) if cfg.thinking else 0
    return elt * 2 * n_blocks * prefix_len * cfg.d_model + think


def incremental_cost(
    cfg: GPRConfig, prefix_len: int, new_tokens: int, beam: int, top_k: int, chunk: int, elt: int
) -> dict[str, float]:
    """Matmul FLOPs and bytes of one rollout step of one user (``IncrementalDecoder``), as the code runs it.

    HSD: ``new_tokens`` queries per block against ``prefix_len + new_tokens`` keys (the cached K/V read
    once); thinking: K queries against the new slots, merged into the cached online-softmax state
    (``Thinking.forward_partial``); refiner; PTD with the context
    keys/values computed once per request and only the generated tokens of each beam re-decoded
    (``beam_fns(cached=True)``); HTE values of the ``top_k`` returned paths. Bytes: activations read and
    written by matmuls/attention (the cached K/V included), the (new x all) mask, weights once per chunk.
    """
    d, h = cfg.d_model, cfg.ffn_mult * cfg.d_model
    tq, tk = new_tokens, prefix_len + new_tokens
    c = _Tally(cfg)
    cc = c.context(cfg, tq, tq, tk)
    if cfg.thinking:
        c.act += (
            2 * cfg.num_thinking * (d + 2 * cfg.n_heads) * 4 / elt
        )  # the float32 partial state read and merged
    c.linear(cc, d, d)  # MTP head-0 adapter, once per request
    for _ in range(cfg.decoder_layers):  # context keys/values through the PTD decoder, once per request
        c.block(cc, cc, 3, cc, cc, 1)
    for lvl, (w, kl) in enumerate(zip(beam_widths(cfg.level_sizes, beam), cfg.level_sizes, strict=True)):
        s = lvl + 1  # BOS + prefix tokens of each beam
        for layer in range(cfg.decoder_layers):
            c.act += 2 * cc * d  # the context K/V, read per request (``beams=``: no per-beam gather)
            q = 1 if layer == cfg.decoder_layers - 1 else s  # the last block: the last token's output only
            c.block(w * s, w * q, 3, q, cc + s, w)
        c.linear(w, d, kl)
    if cfg.hte:  # values of every prefix of the top-K paths (the empty prefix once per request)
        m = 1 + top_k * cfg.path_len
        c.linear(1, d, d)
        c.linear(m, d, h)
        c.linear(m, h, d)
        c.linear(m, d, 1)
    bytes_ = elt * c.act + tq * tk + elt * c.weights / max(chunk, 1)
    return {
        "flops": c.flops,
        "flops_min": c.flops,
        "bytes": bytes_,
        "kv_bytes": state_bytes_per_user(cfg, prefix_len, elt),
    }


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul in ``dtype``."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in bytes/s (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * 4 * n * reps / (time.perf_counter() - t)


# -- decoding -------------------------------------------------------------------------------------
class Decoder:
    """Batched decode of one micro-batch: HSD -> PTD context -> beam search (eager or compiled parts)."""

    def __init__(self, model: GPRModel, trie: PrefixTrie, compiled: bool) -> None:
        self.model, self.trie = model, trie
        self.hsd = torch.compile(model.hsd, dynamic=False) if compiled else model.hsd

        def step(context: torch.Tensor, row: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            return model.beam_fns(context)[0](row, prefix)  # the production step_fn (agents.policies.gpr)

        self.step = torch.compile(step, dynamic=False) if compiled else step

    def __call__(self, tokens: TokenBatch, beam: int, top_k: int) -> torch.Tensor:
        gen = torch.Generator(device=tokens.type_ids.device).manual_seed(0)
        hidden = self.hsd(tokens).hidden
        ctx = self.model.ptd.context(hidden, tokens.padding_mask, gen)  # == model.context(tokens, gen)
        res = beam_search(
            lambda row, prefix: self.step(ctx, row, prefix),
            self.trie,
            batch_size=tokens.type_ids.shape[0],
            beam_width=beam,
            top_k=top_k,
        )
        return res.items


def step_inputs(b: int, cfg: GPRConfig, new_tokens: int, device: torch.device, seed: int = 0) -> dict:
    """Random first-step inputs of ``IncrementalDecoder.prefill`` for ``b`` users: the shown ad (codes,
    item id), its funnel events, the new E token's context; and the refiner noise (one generator seeded 0)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_i = new_tokens - 1
    return {
        "codes": torch.stack(
            [torch.randint(0, k, (b,), generator=gen, device=device) for k in cfg.level_sizes], 1
        ),
        "items": torch.randint(0, 1 << 20, (b,), generator=gen, device=device),
        "events": torch.randint(1, 4, (b, max(n_i, 1)), generator=gen, device=device)[:, :n_i],
        "context": torch.randn(b, cfg.dense_dim, generator=gen, device=device),
        "noise": torch.randn(
            b, cfg.d_model, device=device, generator=torch.Generator(device=device).manual_seed(0)
        ),
    }


def prefill_state(
    dec: IncrementalDecoder, tokens: TokenBatch, seed: int = 0, sub: int = 4096
) -> IncrementalState:
    """``dec.prefill`` of ``tokens`` with ``step_inputs`` drawn from ``seed``."""
    cfg, dev = dec.model.cfg, tokens.type_ids.device
    return dec.prefill(
        tokens, **step_inputs(tokens.type_ids.shape[0], cfg, dec.new_tokens, dev, seed), sub=sub
    )


def time_incremental(
    dec: IncrementalDecoder,
    states: list[IncrementalState],
    n: int,
    beam: int,
    top_k: int,
    device,
    dtype,
    reps: int,
    env_step=None,
) -> float:
    """Seconds per rollout step of N users (the chunk states cycled over the N rows).

    With ``env_step`` (a ``benchmarks.bench_env.native_step`` of N sessions) every step ends with the env
    step on the decoded top-K items of all N users: auction, funnel, budgets, observations, resets.
    """
    chunk = states[0].codes.shape[0]
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    cands = torch.full((n, top_k), -1, dtype=torch.long, device=states[0].codes.device)

    def one_step() -> None:
        for i, m in enumerate(sizes):
            st = states[i % len(states)]
            out = dec(st if m == chunk else st.rows(slice(0, m)), beam, top_k)
            cands[i * chunk : i * chunk + m].copy_(out.items)
        if env_step is not None:
            env_step(cands)

    with torch.no_grad(), autocast(device, dtype):
        for j, m in dict.fromkeys(
            (i % len(states), m) for i, m in enumerate(sizes)
        ):  # each (state, rows) once:
            dec(
                states[j] if m == chunk else states[j].rows(slice(0, m)), beam, top_k
            )  # compile / capture here
        if env_step is not None:
            for _ in range(3):  # the env core's compile, and resets of the first sessions that end
                env_step(cands)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            one_step()
        sync(device)
    return (time.perf_counter() - t) / reps


def naive_incremental_rate(
    dec: IncrementalDecoder, state: IncrementalState, requests: int, beam: int, top_k: int, device, dtype
) -> float:
    """Decisions/s of the same (eager) incremental step, one user at a time."""
    rows = [state.rows(slice(r, r + 1)) for r in range(requests)]
    with torch.no_grad(), autocast(device, dtype):
        dec(rows[0], beam, top_k)
        sync(device)
        t = time.perf_counter()
        for r in rows:
            dec(r, beam, top_k)
        sync(device)
    return requests / (time.perf_counter() - t)


def time_decode(
    decode, batches: list[TokenBatch], n: int, beam: int, top_k: int, device, dtype, reps: int
) -> float:
    """Seconds per pass over N requests (``batches`` cycled over the N rows)."""
    chunk = batches[0].type_ids.shape[0]
    sizes = [min(chunk, n - s) for s in range(0, n, chunk)]
    with torch.no_grad(), autocast(device, dtype):
        decode(batches[0], beam, top_k)  # warm-up (and compilation) at the timed shape
        if sizes[-1] != chunk:
            decode(_head(batches[0], sizes[-1]), beam, top_k)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            for i, m in enumerate(sizes):
                tok = batches[i % len(batches)]
                decode(tok if m == chunk else _head(tok, m), beam, top_k)
        sync(device)
    return (time.perf_counter() - t) / reps


def _head(tokens: TokenBatch, m: int) -> TokenBatch:
    return TokenBatch(*(x[:m] for x in tokens))


def naive_rate(
    decode: Decoder, tokens: TokenBatch, requests: int, beam: int, top_k: int, device, dtype
) -> float:
    """Decisions/s decoding one request at a time (first ``requests`` rows of ``tokens``)."""
    rows = [TokenBatch(*(x[i : i + 1] for x in tokens)) for i in range(requests)]
    with torch.no_grad(), autocast(device, dtype):
        decode(rows[0], beam, top_k)
        sync(device)
        t = time.perf_counter()
        for r in rows:
            decode(r, beam, top_k)
        sync(device)
    return requests / (time.perf_counter() - t)


def train_rate(model: GPRModel, tokens: TokenBatch, steps: int, device, dtype) -> float:
    """Tokens/s of ``mtp_loss`` forward + backward (no optimizer step)."""
    b, t = tokens.type_ids.shape
    gen = torch.Generator(device=device).manual_seed(1)
    cfg = model.cfg
    targets = torch.stack(
        [torch.randint(0, k, (b, cfg.mtp_heads), generator=gen, device=device) for k in cfg.level_sizes], -1
    )
    model.train()
    try:
        for i in range(steps + 1):
            if i == 1:
                sync(device)
                t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = model.mtp_loss(tokens, targets, generator=gen).loss
            loss.backward()
        sync(device)
        return b * t * steps / (time.perf_counter() - t0)
    finally:
        model.eval()


def ffn_impls(model: GPRModel, tokens: TokenBatch, device, dtype, reps: int = 5) -> list[dict]:
    """Each ``TypedFFN.impl`` on the first block's FFN, one micro-batch: ms per call and max |diff| vs loop."""
    ffn = model.hsd.blocks[0].ffn
    if len(ffn.mlps) == 1:
        return []
    x = torch.randn(*tokens.type_ids.shape, model.cfg.d_model, device=device)
    out, ref = [], None
    try:
        for impl in ("loop", "chunked", "grouped"):
            ffn.impl = impl
            try:
                with torch.no_grad(), autocast(device, dtype):
                    y = ffn(x, tokens.type_ids)
                    sync(device)
                    t = time.perf_counter()
                    for _ in range(reps):
                        ffn(x, tokens.type_ids)
                    sync(device)
                ms = (time.perf_counter() - t) / reps * 1e3
                ref = y.float() if ref is None else ref
                out.append(
                    {"impl": impl, "ms": ms, "max_abs_diff_vs_loop": (y.float() - ref).abs().max().item()}
                )
            except Exception as e:  # e.g. grouped_mm without a kernel for this device/dtype
                out.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    finally:
        del ffn.impl  # back to the class default
    return out


# -- main -----------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (float32 = off)"
    )
    p.add_argument("--sizes", default="1024,16384,131072", help="comma-separated N requests per measurement")
    p.add_argument("--beams", default="8,40", help="comma-separated beam widths")
    p.add_argument("--top-k", type=int, default=8, help="items per decision (capped at the beam width)")
    p.add_argument("--chunk", type=int, default=4096, help="micro-batch of requests (0 = all N at once)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd HSD + step function")
    p.add_argument(
        "--mode",
        default="full",
        help="comma-separated: full (re-encode T tokens per decision) "
        "and/or incremental (rollout step on a per-user KV cache)",
    )
    p.add_argument(
        "--inc-chunk",
        type=int,
        default=0,
        help="incremental: users per step batch (0 = --chunk); two chunk states are held on the device",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=2,
        help="incremental: tokens appended per step (new_tokens - 1 I tokens + the E token)",
    )
    p.add_argument(
        "--fuse",
        action="store_true",
        help="incremental: also time the whole step as one compiled graph (fused) and, on CUDA, that graph "
        "replayed as a CUDA graph (graphs)",
    )
    p.add_argument(
        "--inc-modes",
        default="",
        help="incremental: comma-separated modes to time (eager, compiled, fused, graphs); "
        "default: eager, + compiled with --compile, + fused and graphs with --fuse",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the fused step (e.g. max-autotune-no-cudagraphs); default: torch's default",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="incremental: per mode, device time by kernel of one step at the largest N and first beam",
    )
    p.add_argument("--reps", type=int, default=1, help="timed passes over N")
    p.add_argument(
        "--env-step",
        action="store_true",
        help="incremental: also time every mode with the env step of N sessions (ads-v0's BatchedMarket on the "
        "decoded top-K; compiled core unless eager, as benchmarks/bench_env.py) in the loop: rows 'incremental+env'",
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="T = 2 + Ho + Hi slots")
    p.add_argument("--items", type=int, default=100_000, help="items in the trie")
    p.add_argument("--levels", default="64,64,64", help="codes per semantic-ID level")
    p.add_argument(
        "--naive-requests", type=int, default=16, help="requests of the one-at-a-time baseline (0 = skip)"
    )
    p.add_argument("--train-batch", type=int, default=256, help="requests per MTP training step (0 = skip)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--ffn-impl", default="auto", help="TypedFFN.impl: auto, grouped, chunked or loop")
    p.add_argument("--out", default="benchmarks/results/bench_decode.json")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    levels = tuple(_ints(args.levels))
    if args.seq_len < 2:
        raise SystemExit("--seq-len must be >= 2")
    ho = (args.seq_len - 2) // 2
    schema = SchemaConfig(organic_len=ho, ad_len=args.seq_len - 2 - ho)
    decode_modes = [m for m in args.mode.split(",") if m]
    if not decode_modes or set(decode_modes) - {"full", "incremental"}:
        raise SystemExit(f"--mode must list full and/or incremental, got {args.mode!r}")
    args.decode_modes = decode_modes
    if "incremental" in decode_modes and args.new_tokens < 1:
        raise SystemExit(f"--new-tokens must be >= 1 (the E token), got {args.new_tokens}")
    # incremental: the appended tokens' positions run up to T - 1 + new_tokens - 1
    max_len = schema.seq_len + (args.new_tokens if "incremental" in decode_modes else 0)
    cfg = GPRConfig(
        level_sizes=levels,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        max_len=max_len,
    )
    previous_impl, TypedFFN.impl = TypedFFN.impl, args.ffn_impl
    try:
        return _run(args, cfg, schema, levels, device, dtype, argv)
    finally:
        TypedFFN.impl = previous_impl


def _measure(row: dict, cost: dict, timed, n: int, naive: float | None, mm_rate, bw, device) -> dict:
    """Fill one result row: cost, floor, timing (errors recorded, not raised), ratio to the naive loop."""
    floor = 1.0 / max(cost["flops"] / mm_rate, cost["bytes"] / bw)
    row.update(
        flops_per_decision=cost["flops"],
        flops_min_per_decision=cost["flops_min"],
        bytes_per_decision=cost["bytes"],
        floor_decisions_per_s=floor,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sec = timed()
    except torch.OutOfMemoryError:
        row["error"] = "out of memory (lower --chunk)"
        torch.cuda.empty_cache()
    except Exception as e:  # a compiler failure must not lose the other rows
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    else:
        dps = n / sec
        row.update(
            seconds=sec,
            decisions_per_s=dps,
            frac_of_floor=dps / floor,
            achieved_flops_per_s=dps * cost["flops"],
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
        if naive:
            row.update(naive_decisions_per_s=naive, x_naive=dps / naive)
    msg = row.get("error") or f"{row['decisions_per_s']:,.0f} decisions/s"
    print(f"  {row['decode']} {row['mode']} N={row['n']} W={row['beam']}: {msg}", flush=True)
    return row


def _run_incremental(
    args,
    model,
    trie,
    cfg,
    schema,
    batches,
    sizes,
    beams,
    chunk,
    device,
    dtype,
    mm_rate,
    bw,
    elt,
    naive,
    prefill,
    checkpoint,
) -> None:
    """Rows of the incremental mode: prefill the chunk states once (timed apart), then time steps."""
    t0 = schema.seq_len
    names = ["eager"] + (["compiled"] if args.compile else []) + (["fused"] if args.fuse else [])
    names += ["graphs"] if args.fuse and device.type == "cuda" else []
    if args.inc_modes:  # an explicit list replaces the one --compile / --fuse give
        names = [m for m in args.inc_modes.split(",") if m]
        if not names or set(names) - set(IncrementalDecoder.MODES):
            raise SystemExit(
                f"--inc-modes must list some of {', '.join(IncrementalDecoder.MODES)}, got {args.inc_modes!r}"
            )
    modes = [
        (name, IncrementalDecoder(model, trie, name, args.new_tokens, args.compile_mode)) for name in names
    ]
    eager = dict(modes).get("eager") or IncrementalDecoder(
        model, trie, "eager", args.new_tokens
    )  # prefill, naive
    ichunk = chunk if args.inc_chunk <= 0 else min(args.inc_chunk, max(sizes))
    with torch.no_grad(), autocast(device, dtype):
        prefill_state(eager, _head(batches[0], min(chunk, 8)))  # warm-up
        sync(device)
        sec, states = 0.0, []
        for i in range(2):
            tok = batches[i] if ichunk == chunk else make_tokens(ichunk, schema, cfg, device, seed=i)
            sync(device)
            t = time.perf_counter()
            states.append(prefill_state(eager, tok, seed=i, sub=min(ichunk, 4096)))
            sync(device)
            sec += time.perf_counter() - t
            del tok
    users = 2 * ichunk
    state_bytes = state_bytes_per_user(cfg, t0, states[0].layers[0].k.element_size())
    prefill.update(users=users, seconds=sec, users_per_s=users / sec, state_bytes_per_user=state_bytes)
    print(
        f"  prefill (eager HSD + thinking partial, T={t0}): {users / sec:,.0f} users/s, "
        f"state {state_bytes / 2**20:.3f} MiB/user",
        flush=True,
    )
    if args.naive_requests > 0:
        for w in beams:
            naive[w] = naive_incremental_rate(
                eager, states[0], min(args.naive_requests, chunk), w, min(args.top_k, w), device, dtype
            )
            print(f"  naive incremental W={w}: {naive[w]:,.1f} decisions/s", flush=True)
    env_steps: dict[tuple, tuple] = {}  # --env-step: (N, top-k, compiled) -> (step, bytes per user-step)
    for mode, dec in modes:
        for n in sizes:
            cs = [s if s.codes.shape[0] <= n else s.rows(slice(0, n)) for s in states]
            c = cs[0].codes.shape[0]
            for w in beams:
                k = min(args.top_k, w)
                cost = incremental_cost(cfg, t0, args.new_tokens, w, k, c, elt)
                row = {
                    "decode": "incremental",
                    "mode": mode,
                    "n": n,
                    "beam": w,
                    "top_k": k,
                    "chunk": c,
                    "new_tokens": args.new_tokens,
                    "prefix_len": t0,
                    "kv_bytes_per_decision": cost["kv_bytes"],
                    "resident_state_gib": n * state_bytes / 2**30,
                }
                checkpoint(
                    _measure(
                        row,
                        cost,
                        functools.partial(time_incremental, dec, cs, n, w, k, device, dtype, args.reps),
                        n,
                        naive.get(w),
                        mm_rate,
                        bw,
                        device,
                    )
                )
                if args.profile and n == max(sizes) and w == beams[0]:
                    row["profile"] = profile_step(dec, cs[0], w, k, device, dtype)
                if args.env_step:
                    key = (n, k, mode != "eager")  # one market (world, compiled core) per size and kind
                    if key not in env_steps:
                        env_steps[key] = _env_step(args, n, k, device, compiled=key[2])
                    step, env_bytes = env_steps[key]
                    env_row = {**row, "decode": "incremental+env", "env_bytes_per_step": env_bytes}
                    for key in ("profile", "error", "decisions_per_s", "x_naive", "naive_decisions_per_s"):
                        env_row.pop(key, None)
                    timed = functools.partial(
                        time_incremental, dec, cs, n, w, k, device, dtype, args.reps, step
                    )
                    checkpoint(
                        _measure(
                            env_row,
                            {**cost, "bytes": cost["bytes"] + env_bytes},
                            timed,
                            n,
                            naive.get(w),
                            mm_rate,
                            bw,
                            device,
                        )
                    )
                dec.release()


def _env_step(args, n: int, top_k: int, device, compiled: bool):
    """The env step of N sessions on (N, top_k) candidates and its bytes floor per user-step: the world of
    ``benchmarks/bench_env.py``'s rows, with ``--items`` ads (the trie's items are the ad ids)."""
    from benchmarks.bench_env import bytes_per_step, native_step
    from envs.market import BatchedMarket
    from gpr_sim.world import WorldConfig

    cfg = WorldConfig.small(
        num_candidates=top_k,
        num_ads=args.items,
        num_advertisers=min(1000, args.items),
        num_organic=200_000,
        num_users=1_000_000,
    )
    market = BatchedMarket(cfg, n, device=device)
    market.reset(seed=0)
    return native_step(market, compiled), bytes_per_step(cfg)


def profile_step(
    dec: IncrementalDecoder, st: IncrementalState, beam: int, top_k: int, device, dtype, top: int = 12
) -> dict:
    """Device time of one (warm) step by kernel: where the step's time goes. Printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), autocast(device, dtype):
        dec(st, beam, top_k)
        sync(device)
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            dec(st, beam, top_k)
            sync(device)
        wall = time.perf_counter() - t
    kernels = {}
    for e in prof.events():
        if device.type == "cuda" and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if device.type == "cuda" else e.self_cpu_time_total
        name = e.name[:90]
        hit = kernels.setdefault(name, [0.0, 0])
        hit[0], hit[1] = hit[0] + us, hit[1] + 1
    total = sum(v[0] for v in kernels.values())
    rows = sorted(
        (
            {"kernel": k, "us": v[0], "calls": v[1], "share": v[0] / max(total, 1e-9)}
            for k, v in kernels.items()
        ),
        key=lambda r: -r["us"],
    )
    print(
        f"  profile {dec.mode} W={beam}: {len(rows)} kernels, {sum(v[1] for v in kernels.values())} launches, "
        f"device {total / 1e3:.2f} ms of {wall * 1e3:.2f} ms wall (profiled)",
        flush=True,
    )
    for r in rows[:top]:
        print(f"    {r['us'] / 1e3:8.3f} ms {r['share']:6.1%} x{r['calls']:<4} {r['kernel']}")
    # the operators that launched them (empty under a CUDA graph replay: no operator runs on the host)
    ops = sorted(
        (
            {"op": e.key, "us": e.self_device_time_total, "calls": e.count}
            for e in prof.key_averages()
            if e.self_device_time_total > 0 and e.key.startswith("aten::")
        ),
        key=lambda r: -r["us"],
    )
    for r in ops[:top]:
        print(f"    {r['us'] / 1e3:8.3f} ms x{r['calls']:<4} {r['op']}")
    return {
        "device_ms": total / 1e3,
        "wall_ms": wall * 1e3,
        "launches": sum(v[1] for v in kernels.values()),
        "kernels": rows[:40],
        "aten_ops": ops[:20],
    }


def _run(args, cfg: GPRConfig, schema: SchemaConfig, levels: tuple[int, ...], device, dtype, argv) -> dict:
    if args.compile:
        import torch._dynamo as dynamo

        for name in ("cache_size_limit", "recompile_limit"):  # one graph per (shape, level): many shapes
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, 256)
    torch.manual_seed(0)
    model = GPRModel(cfg).to(device).eval()
    trie = make_trie(args.items, levels, device)
    sizes, beams = _ints(args.sizes), _ints(args.beams)
    chunk = max(sizes) if args.chunk <= 0 else min(args.chunk, max(sizes))
    batches = [make_tokens(chunk, schema, cfg, device, seed=s) for s in range(2)]

    mm_rate = matmul_rate(device, dtype)
    bw = copy_bandwidth(device)
    elt = torch.finfo(dtype).bits // 8
    rows: list[dict] = []
    naive: dict[int, float] = {}
    naive_inc: dict[int, float] = {}
    prefill: dict = {}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(row: dict) -> dict:
        """Keep the rows so far in ``--out`` (marked partial) so a killed run still leaves them."""
        rows.append(row)
        cmd = " ".join(
            ["python", "benchmarks/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]
        )
        partial = {
            "partial": True,
            "command": cmd,
            "rows": rows,
            "prefill": prefill or None,
            "matmul_flops_per_s": mm_rate,
            "copy_bytes_per_s": bw,
        }
        out_path.write_text(json.dumps(partial, indent=2))
        return row

    for decode_mode in args.decode_modes:  # in the order given
        if decode_mode == "incremental":
            _run_incremental(
                args,
                model,
                trie,
                cfg,
                schema,
                batches,
                sizes,
                beams,
                chunk,
                device,
                dtype,
                mm_rate,
                bw,
                elt,
                naive_inc,
                prefill,
                checkpoint,
            )
            continue
        eager = Decoder(model, trie, compiled=False)
        if args.naive_requests > 0:
            for w in beams:
                naive[w] = naive_rate(
                    eager, batches[0], min(args.naive_requests, chunk), w, min(args.top_k, w), device, dtype
                )
                print(f"  naive full W={w}: {naive[w]:,.1f} decisions/s", flush=True)
        modes = [("eager", eager)] + (
            [("compiled", Decoder(model, trie, compiled=True))] if args.compile else []
        )
        for mode, dec in modes:
            for n in sizes:
                cb = [b if b.type_ids.shape[0] <= n else _head(b, n) for b in batches]
                for w in beams:
                    k = min(args.top_k, w)
                    cost = decode_cost(cfg, schema.seq_len, w, cb[0].type_ids.shape[0], elt)
                    checkpoint(
                        _measure(
                            {
                                "decode": "full",
                                "mode": mode,
                                "n": n,
                                "beam": w,
                                "top_k": k,
                                "chunk": cb[0].type_ids.shape[0],
                            },
                            cost,
                            functools.partial(time_decode, dec, cb, n, w, k, device, dtype, args.reps),
                            n,
                            naive.get(w),
                            mm_rate,
                            bw,
                            device,
                        )
                    )

    train = None
    if args.train_batch > 0:
        tb = make_tokens(args.train_batch, schema, cfg, device, seed=7)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tps = train_rate(model, tb, args.train_steps, device, dtype)
            train = {
                "batch": args.train_batch,
                "seq_len": schema.seq_len,
                "steps": args.train_steps,
                "tokens_per_s": tps,
                "requests_per_s": tps / schema.seq_len,
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
            }
        except Exception as e:
            train = {"batch": args.train_batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ffn = ffn_impls(model, batches[0], device, dtype)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; d={cfg.d_model} layers={cfg.n_layers} "
        f"T={schema.seq_len} levels={list(levels)} items={args.items} params={n_params / 1e6:.2f}M; "
        f"matmul {mm_rate / 1e12:.2f} TFLOP/s, copy {bw / 1e9:.0f} GB/s; FFN impl {args.ffn_impl}"
    )
    print(
        f"{'decode':<17}{'mode':<10}{'N':>8}{'W':>4}{'decisions/s':>14}{'x naive':>9}{'GFLOP/dec':>11}"
        f"{'MB/dec':>9}{'floor/s':>12}{'of floor':>10}{'GFLOP/s':>10}{'peak GiB':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['decode']:<17}{r['mode']:<10}{r['n']:>8}{r['beam']:>4}  {r['error']}")
            continue
        peak = float("nan") if r["peak_gib"] is None else r["peak_gib"]
        print(
            f"{r['decode']:<17}{r['mode']:<10}{r['n']:>8}{r['beam']:>4}{r['decisions_per_s']:>14,.0f}"
            f"{r.get('x_naive', math.nan):>9.1f}{r['flops_per_decision'] / 1e9:>11.3f}"
            f"{r['bytes_per_decision'] / 1e6:>9.3f}{r['floor_decisions_per_s']:>12,.0f}{r['frac_of_floor']:>10.3f}"
            f"{r['achieved_flops_per_s'] / 1e9:>10,.1f}{peak:>10.2f}"
        )
    if prefill:
        print(
            f"prefill: {prefill['users_per_s']:,.0f} users/s; state {prefill['state_bytes_per_user'] / 2**20:.3f} "
            f"MiB/user (resident for N users: N x that)"
        )
    if train:
        print(
            "train (mtp_loss fwd+bwd): "
            + (
                train.get("error")
                or f"{train['tokens_per_s']:,.0f} tokens/s "
                f"({train['requests_per_s']:,.0f} requests/s) at batch {train['batch']}"
            )
        )
    for f in ffn:
        print(
            f"ffn {f['impl']:<8}: "
            + (f.get("error") or f"{f['ms']:.3f} ms, max |diff| vs loop {f['max_abs_diff_vs_loop']:.2e}")
        )

    result = {
        "device": name,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(
            ["python", "benchmarks/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": vars(args),
        "config": {
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "ffn_mult": cfg.ffn_mult,
            "seq_len": schema.seq_len,
            "levels": list(levels),
            "items": args.items,
            "params": n_params,
        },
        "matmul_flops_per_s": mm_rate,
        "copy_bytes_per_s": bw,
        "naive_decisions_per_s": {str(w): v for w, v in naive.items()},
        "naive_incremental_decisions_per_s": {str(w): v for w, v in naive_inc.items()},
        "prefill": prefill or None,
        "rows": rows,
        "train": train,
        "ffn_impls": ffn,
    }
    out_path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
