"""Decisions per second of GPR decoding: HSD forward + PTD context + trie-constrained beam search.

    python benchmarks/bench_decode.py --device cpu --sizes 8 --beams 4 --seq-len 16 --items 2000   # smoke
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --sizes 1024,16384,131072 --beams 8,40 --compile

One decision = one request decoded to its top-K items (``--top-k``, capped at the beam width) by
``beam_search`` over a ``PrefixTrie`` of ``--items`` random paths with ``--levels`` codes per level, with
the model's own ``beam_fns`` (the production path of ``agents.gpr_policy``). Requests are synthetic
``TokenBatch`` rows in the schema layout ``[U | O x Ho | I x Hi | E]`` with T = ``--seq-len`` slots
(Ho = Hi = (T - 2) / 2, ~10% of history slots padded), built before the clock starts. N requests run
in micro-batches of ``--chunk`` (activation memory grows with the chunk, not with N).

Rows:
- ``eager`` / ``compiled``: the same decode; ``compiled`` runs the HSD forward and the per-level step
  function (context gather + ``level_logits``) through ``torch.compile``; thinking, the refiner and the
  beam bookkeeping (topk, trie lookups) stay eager.
- ``naive``: one request at a time through the same eager model and beam search, timed on
  ``--naive-requests`` requests and extrapolated; ``x naive`` = batched / naive decisions per second.
- floor: FLOPs per decision (matmuls of the config, counted as the code runs them, ``decode_cost``)
  over a measured square-matmul rate in the same dtype, and bytes per decision (activations each
  matmul reads and writes, the attention mask, weights once per micro-batch) over a measured copy
  bandwidth; the floor time is the larger of the two. ``of floor`` = achieved / floor decisions per s.
- ``train``: tokens per second of ``model.mtp_loss`` forward + backward on ``--train-batch`` requests.
- ``ffn``: the token-aware FFN implementations (``TypedFFN.impl``) side by side on one micro-batch.

Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from gpr_sim.decoding import beam_search  # noqa: E402
from gpr_sim.model import GPRConfig, GPRModel  # noqa: E402
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


def decode_cost(cfg: GPRConfig, seq_len: int, beam: int, chunk: int, elt: int) -> dict[str, float]:
    """Matmul FLOPs and bytes of one decision, as the code runs it (no KV cache in the PTD).

    ``flops_min`` is the same decision with the PTD context tokens encoded once per request and one new
    token per beam and level (a KV-cached decoder): what a PTD cache would leave.
    """
    d, h, t = cfg.d_model, cfg.ffn_mult * cfg.d_model, seq_len
    flops = 0.0
    act = 0.0  # activation elements read + written by matmuls / attention
    weights = 0  # parameter elements touched

    def linear(m: float, i: int, o: int) -> None:
        nonlocal flops, act, weights
        flops += 2 * m * i * o
        act += m * (i + o)
        weights += i * o

    def attention(tq: float, tk: float, n_seq: float) -> None:  # one sequence set, all heads
        nonlocal flops, act
        flops += n_seq * 4 * tq * tk * d  # QK^T and AV
        act += n_seq * (2 * tq + 2 * tk) * d

    n_blocks = cfg.n_layers + (cfg.max_recursions - 1 if cfg.mixture_of_recursions else 0)
    for _ in range(n_blocks):  # HSD
        linear(t, d, 4 * d)
        attention(t, t, 1)
        linear(t, d, d)
        linear(t, d, h)
        linear(t, h, d)
    mask_bytes = t * t  # (T, T) bool hybrid mask per request
    cc = 0
    if cfg.thinking:
        k = cfg.num_thinking
        linear(t, d, 2 * d)
        linear(k, d, d)
        attention(k, t, 1)
        linear(k, d, d)
        linear(k, d, h)
        linear(k, h, d)
        cc += k
    else:
        cc += 1
    if cfg.refining:
        for _ in range(cfg.refine_steps):
            linear(1, 3 * d, 2 * d)
            linear(1, 2 * d, d)
        cc += 1
    hsd_ctx_flops = flops
    widths = beam_widths(cfg.level_sizes, beam)
    for lvl, (w, k) in enumerate(zip(widths, cfg.level_sizes, strict=True)):
        s = cc + lvl + 1  # context + BOS + prefix tokens, re-decoded for every beam
        act += w * cc * d  # the context gathered per beam
        linear(w * cc, d, d)  # MTP head-0 adapter on the gathered context
        for _ in range(cfg.decoder_layers):
            linear(w * s, d, 3 * d)
            attention(s, s, w)
            linear(w * s, d, d)
            linear(w * s, d, h)
            linear(w * s, h, d)
        linear(w, d, k)
    # KV-cached PTD: the context through the decoder once, then one token per beam and level
    ptd_min = 2 * cc * d * d + cfg.decoder_layers * cc * (2 * d * 4 * d + 4 * d * h) + 4 * cc * cc * d
    for lvl, (w, k) in enumerate(zip(widths, cfg.level_sizes, strict=True)):
        ptd_min += w * (cfg.decoder_layers * (2 * d * 4 * d + 4 * d * h + 4 * (cc + lvl + 1) * d) + 2 * d * k)
    bytes_ = elt * act + mask_bytes + elt * weights / max(chunk, 1)
    return {"flops": flops, "flops_min": hsd_ctx_flops + ptd_min, "bytes": bytes_}


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
            return model.beam_fns(context)[0](row, prefix)  # the production step_fn (agents.gpr_policy)

        self.step = torch.compile(step, dynamic=False) if compiled else step

    def __call__(self, tokens: TokenBatch, beam: int, top_k: int) -> torch.Tensor:
        gen = torch.Generator(device=tokens.type_ids.device).manual_seed(0)
        hidden = self.hsd(tokens).hidden
        ctx = self.model.ptd.context(hidden, tokens.padding_mask, gen)  # == model.context(tokens, gen)
        res = beam_search(lambda row, prefix: self.step(ctx, row, prefix), self.trie,
                          batch_size=tokens.type_ids.shape[0], beam_width=beam, top_k=top_k)  # fmt: skip
        return res.items


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
    p.add_argument("--reps", type=int, default=1, help="timed passes over N")
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
    cfg = GPRConfig(level_sizes=levels, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    max_len=schema.seq_len)  # fmt: skip
    previous_impl, TypedFFN.impl = TypedFFN.impl, args.ffn_impl
    try:
        return _run(args, cfg, schema, levels, device, dtype, argv)
    finally:
        TypedFFN.impl = previous_impl


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
    eager = Decoder(model, trie, compiled=False)
    if args.naive_requests > 0:
        for w in beams:
            naive[w] = naive_rate(
                eager, batches[0], min(args.naive_requests, chunk), w, min(args.top_k, w), device, dtype
            )
            print(f"  naive W={w}: {naive[w]:,.1f} decisions/s", flush=True)
    modes = [("eager", eager)] + ([("compiled", Decoder(model, trie, compiled=True))] if args.compile else [])
    for mode, dec in modes:
        for n in sizes:
            cb = [b if b.type_ids.shape[0] <= n else _head(b, n) for b in batches]
            for w in beams:
                k = min(args.top_k, w)
                cost = decode_cost(cfg, schema.seq_len, w, cb[0].type_ids.shape[0], elt)
                floor = 1.0 / max(cost["flops"] / mm_rate, cost["bytes"] / bw)
                row = {"mode": mode, "n": n, "beam": w, "top_k": k, "chunk": cb[0].type_ids.shape[0],
                       "flops_per_decision": cost["flops"], "flops_min_per_decision": cost["flops_min"],
                       "bytes_per_decision": cost["bytes"], "floor_decisions_per_s": floor}  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    sec = time_decode(dec, cb, n, w, k, device, dtype, args.reps)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory (lower --chunk)"
                    torch.cuda.empty_cache()
                except Exception as e:  # a compiler failure must not lose the other rows
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                else:
                    dps = n / sec
                    row.update(seconds=sec, decisions_per_s=dps, frac_of_floor=dps / floor,
                               achieved_flops_per_s=dps * cost["flops"],
                               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)  # fmt: skip
                    if w in naive:
                        row.update(naive_decisions_per_s=naive[w], x_naive=dps / naive[w])
                rows.append(row)
                msg = row.get("error") or f"{row['decisions_per_s']:,.0f} decisions/s"
                print(f"  {mode} N={n} W={w}: {msg}", flush=True)

    train = None
    if args.train_batch > 0:
        tb = make_tokens(args.train_batch, schema, cfg, device, seed=7)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tps = train_rate(model, tb, args.train_steps, device, dtype)
            train = {"batch": args.train_batch, "seq_len": schema.seq_len, "steps": args.train_steps,
                     "tokens_per_s": tps, "requests_per_s": tps / schema.seq_len,
                     "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}  # fmt: skip
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
    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; d={cfg.d_model} layers={cfg.n_layers} "
          f"T={schema.seq_len} levels={list(levels)} items={args.items} params={n_params / 1e6:.2f}M; "
          f"matmul {mm_rate / 1e12:.2f} TFLOP/s, copy {bw / 1e9:.0f} GB/s; FFN impl {args.ffn_impl}")  # fmt: skip
    print(f"{'mode':<10}{'N':>8}{'W':>4}{'decisions/s':>14}{'x naive':>9}{'GFLOP/dec':>11}"
          f"{'of floor':>10}{'GFLOP/s':>10}{'peak GiB':>10}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10}{r['n']:>8}{r['beam']:>4}  {r['error']}")
            continue
        peak = float("nan") if r["peak_gib"] is None else r["peak_gib"]
        print(f"{r['mode']:<10}{r['n']:>8}{r['beam']:>4}{r['decisions_per_s']:>14,.0f}{r.get('x_naive', math.nan):>9.1f}"
              f"{r['flops_per_decision'] / 1e9:>11.3f}{r['frac_of_floor']:>10.3f}"
              f"{r['achieved_flops_per_s'] / 1e9:>10,.1f}{peak:>10.2f}")  # fmt: skip
    if train:
        print("train (mtp_loss fwd+bwd): " + (train.get("error") or f"{train['tokens_per_s']:,.0f} tokens/s "
              f"({train['requests_per_s']:,.0f} requests/s) at batch {train['batch']}"))  # fmt: skip
    for f in ffn:
        print(
            f"ffn {f['impl']:<8}: "
            + (f.get("error") or f"{f['ms']:.3f} ms, max |diff| vs loop {f['max_abs_diff_vs_loop']:.2e}")
        )

    result = {
        "device": name, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(["python", "benchmarks/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args), "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                                       "ffn_mult": cfg.ffn_mult, "seq_len": schema.seq_len, "levels": list(levels),
                                       "items": args.items, "params": n_params},
        "matmul_flops_per_s": mm_rate, "copy_bytes_per_s": bw,
        "naive_decisions_per_s": {str(w): v for w, v in naive.items()},
        "rows": rows, "train": train, "ffn_impls": ffn,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
