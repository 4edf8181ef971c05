"""Where one minibatch of the RL update spends its device time: each part of the forward + backward, timed alone.

    python benchmarks/bench_update_parts.py --device cuda                     # the H200 setting of bench_rl_iteration
    python benchmarks/bench_update_parts.py --device cpu --sessions 8 --history 3 --d-model 16 --n-layers 1 \\
        --group-size 4 --ads 60 --organic 80 --users 100 --advertisers 6 --minibatch 8 --reps 1   # smoke

``bench_rl_iteration``'s profile names kernels; this names the model's parts. One rollout
(``bench_rl_iteration.build`` / ``model_for``: d=256 x 4, T=256, K=40 by default) fills a buffer; one minibatch
of ``--minibatch`` requests is cut from it, and each row below runs forward + backward (random output
gradient, inputs that need grad where a part's input is an activation) under the update's precision and
compile mode (``PathTerms(compile=...)``), timed with CUDA events (CPU: the wall clock), median of ``--reps``
after ``--warmup``:

| row | what |
|---|---|
| step | ``loss_terms`` + backward: the update's minibatch without the optimiser, the typed FFN sorting the tokens by type |
| step.segments | the same with the slot layout passed (``type_segments``; what ``loop.update`` does): dense GEMMs per run |
| hsd | ``model.hsd(tokens).hidden`` (embedding + blocks + final norm) |
| hsd.embed | ``model.hsd.embed(tokens)`` |
| hsd.blocks | the HSTU blocks on the embedded input (hybrid mask built inside, as ``HSD.forward``) |
| hsd.blocks.segments | the same with the slot layout passed |
| ptd.context | thinking + refiner on the HSD output |
| ptd.paths | ``path_log_prob``: the K paths' teacher-forced log-probs against the context |
| hte.paths | ``model.path_values``: HTE values of every prefix of the K paths |

Then the candidates for the largest parts, on the same shapes (N = minibatch x T tokens):

| row | what |
|---|---|
| ffn.grouped / ffn.chunked | ``TypedFFN`` of one block with ``impl`` forced (the library's paths) |
| ffn.one | one MLP of the same width on all N tokens: the FFN's FLOPs as one dense GEMM pair (no types) |
| ffn.segments | ``TypedFFN`` with the slot layout passed (``type_segments``): dense GEMMs per run of slots, no sort |
| attn.mask / attn.causal / attn.none | ``scaled_dot_product_attention`` with the (B, 1, T, T) hybrid mask, ``is_causal``, no mask |
| attn.flex | ``flex_attention`` with the hybrid mask as a block mask (compiled; skips masked tiles) |
| emb.table{n} / emb.gemm{n} | an n-row table looked up at N ids: ``F.embedding``'s backward vs ``rows_of_type``'s GEMM |

Prints a table (ms and share of ``step``) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from agents.rl.common import LossConfig  # noqa: E402
from agents.rl.hepo import HEPO  # noqa: E402
from agents.rl.loop import PathTerms, loss_terms  # noqa: E402
from agents.rl.rollout import Roller  # noqa: E402
from benchmarks.bench_rl_iteration import build, model_for  # noqa: E402
from gpr_sim.model.hsd import MLP, TypedFFN, hybrid_mask, rows_of_type, type_segments  # noqa: E402
from gpr_sim.model.incremental import path_log_prob  # noqa: E402
from gpr_sim.model.precision import precision_context  # noqa: E402
from gpr_sim.runs import write_json  # noqa: E402


def timer(device: torch.device, warmup: int, reps: int):
    """fn -> median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` (CUDA events on CUDA)."""

    def run(fn) -> float:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    return run


def fwd_bwd(fn, *inputs):
    """A closure running ``fn(*inputs)`` and backpropagating a fixed random gradient through its output(s)."""
    grads: list = []

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        outs = [o for o in outs if torch.is_tensor(o) and o.requires_grad]
        if not grads:
            gen = torch.Generator(device=outs[0].device).manual_seed(0)
            grads.extend(torch.randn(o.shape, device=o.device, generator=gen, dtype=o.dtype) for o in outs)
        torch.autograd.backward(outs, grads)

    return run


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sessions", type=int, default=1024, help="rollout sessions (one minibatch is cut from them)"
    )
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="blocks", help="PathTerms compile mode of the step rows")
    p.add_argument("--history", type=int, default=127)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--group-size", type=int, default=40)
    p.add_argument("--rollout-steps", type=int, default=1)
    p.add_argument("--arr-rate", type=float, default=0.5)
    p.add_argument("--minibatch", type=int, default=1024)
    p.add_argument("--ads", type=int, default=20_000)
    p.add_argument("--organic", type=int, default=40_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--advertisers", type=int, default=1_000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook", type=int, default=64)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/bench_update_parts.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    env, tok = build(args, args.sessions)
    model = model_for(args, env, tok)
    roller = Roller(env, tok, args.group_size, "truth", args.arr_rate, 0, precision=args.precision)
    model.eval()
    buf, _ = roller.collect(model, args.rollout_steps)
    model.train()
    loss_cfg = LossConfig()
    buf.adv, buf.returns = HEPO.targets(buf, loss_cfg)
    rows = torch.nonzero(buf.valid).squeeze(1)[: args.minibatch]
    mb = buf.rows(rows)
    terms = PathTerms(model, cached=True, compile=args.compile)
    tokens = mb.tokens
    b, t = tokens.type_ids.shape
    n = b * t
    time_ms = timer(dev, args.warmup, args.reps)
    results: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        with precision_context(dev, args.precision):
            try:
                results[name] = time_ms(fn)
            except Exception as e:  # a candidate that does not run here (e.g. flex without Triton) is named
                print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                return
        print(f"{name}: {results[name]:.3f} ms", flush=True)

    segments = type_segments(tokens.type_ids)

    def step(seg=None):
        out = loss_terms(HEPO, loss_cfg, terms, None, mb, seg)
        out["loss"].backward()

    timed("step", step)
    timed("step.segments", lambda: step(segments))
    timed("hsd", fwd_bwd(lambda: model.hsd(tokens).hidden))
    timed("hsd.embed", fwd_bwd(lambda: model.hsd.embed(tokens)))
    with precision_context(dev, args.precision), torch.no_grad():
        x0 = model.hsd.embed(tokens)
        hidden = model.hsd(tokens).hidden
        ctx = model.context(tokens, noise=mb.noise)
    mask = hybrid_mask(tokens.type_ids, tokens.padding_mask)

    def blocks(x):
        m = hybrid_mask(tokens.type_ids, tokens.padding_mask)
        for block in model.hsd.blocks:
            x, _ = block(x, tokens.type_ids, m)
        return x

    timed("hsd.blocks", fwd_bwd(blocks, leaf(x0)))

    def blocks_by_segments(x):
        m = hybrid_mask(tokens.type_ids, tokens.padding_mask)
        for block in model.hsd.blocks:
            x, _ = block(x, tokens.type_ids, m, None, segments)
        return x

    timed("hsd.blocks.segments", fwd_bwd(blocks_by_segments, leaf(x0)))
    timed(
        "ptd.context",
        fwd_bwd(lambda h: model.ptd.context(h, tokens.padding_mask, noise=mb.noise), leaf(hidden)),
    )
    timed("ptd.paths", fwd_bwd(lambda c: path_log_prob(model, c, mb.codes, mb.legal), leaf(ctx)))
    timed("hte.paths", fwd_bwd(lambda c: model.path_values(c, mb.codes), leaf(ctx)))

    # -- candidates for the typed FFN, on one block's input ----------------------------------------------------
    block = model.hsd.blocks[0]
    with precision_context(dev, args.precision), torch.no_grad():
        xn = block.ln2(x0, tokens.type_ids)
    for impl in ("grouped", "chunked"):
        ffn = TypedFFN(args.d_model, model.cfg.ffn_mult * args.d_model, len(block.ffn.mlps)).to(dev)
        ffn.load_state_dict(block.ffn.state_dict())
        ffn.impl = impl
        timed(f"ffn.{impl}", fwd_bwd(lambda x, f=ffn: f(x, tokens.type_ids), leaf(xn)))
    one = MLP(args.d_model, model.cfg.ffn_mult * args.d_model).to(dev)
    timed("ffn.one", fwd_bwd(one, leaf(xn)))
    if segments is not None:  # the library's path: TypedFFN.forward with the slot layout
        timed("ffn.segments", fwd_bwd(lambda x: block.ffn(x, tokens.type_ids, segments), leaf(xn)))

    # -- attention with the hybrid mask ------------------------------------------------------------------------
    h, hd = args.n_heads, args.d_model // args.n_heads
    gen = torch.Generator(device=dev).manual_seed(1)
    dt = torch.bfloat16 if args.precision == "bf16" else torch.float32
    qkv = [
        torch.randn(b, h, t, hd, device=dev, generator=gen, dtype=dt).requires_grad_(True) for _ in range(3)
    ]
    timed(
        "attn.mask",
        fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]), *qkv),
    )
    timed(
        "attn.causal", fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *qkv)
    )
    timed("attn.none", fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *qkv))
    if dev.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        allowed = mask

        def mask_mod(bi, hi, qi, ki):
            return allowed[bi, qi, ki]

        flex = torch.compile(flex_attention, dynamic=False)
        try:
            bm = create_block_mask(mask_mod, b, None, t, t, device=dev)
            timed("attn.flex", fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), *qkv))
            timed(
                "attn.flex+mask",
                fwd_bwd(
                    lambda q, k, v: flex(
                        q, k, v, block_mask=create_block_mask(mask_mod, b, None, t, t, device=dev)
                    ),
                    *qkv,
                ),
            )
        except Exception as e:
            print(f"attn.flex: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

    # -- embedding backward of small tables --------------------------------------------------------------------
    for rows_n in (4, 64, 512):
        table = torch.nn.Parameter(torch.randn(rows_n, args.d_model, device=dev))
        ids = torch.randint(0, rows_n, (n,), device=dev, generator=gen)
        timed(f"emb.table{rows_n}", fwd_bwd(lambda w, i=ids: F.embedding(i, w), table))
        timed(f"emb.gemm{rows_n}", fwd_bwd(lambda w, i=ids: rows_of_type(w, i, gemm=True), table))

    step_ms = results.get("step", float("nan"))
    lines = ["| part | ms | share of step |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {v / step_ms:.1%} |" for k, v in results.items()]
    print("\n".join(lines))
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_update_parts.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "minibatch_requests": b,
        "tokens": n,
        "ms": results,
    }
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    run_main(main)
