"""The floors of one RL iteration by ATen op: FLOPs, bytes and kernel launches, counted on the CPU at the GPU's shapes.

    python benchmarks/roofline_rl_iteration.py --measured-rollout-s 0.66 --measured-update-s 2.27
    python benchmarks/roofline_rl_iteration.py --history 3 --d-model 16 --n-layers 1 --n-heads 2 --group-size 4 \\
        --ads 60 --organic 80 --users 100 --advertisers 6 --levels 2 --codebook 4 --sessions 8 --requests 2 \\
        --out /tmp/roofline.json                                                                   # smoke

``benchmarks/bench_rl_iteration.py`` times the iteration and divides the update's matmul FLOPs by the peak (MFU).
What the peak alone does not say is how much of the work no kernel can run at the matmul rate because it moves more
bytes than it computes (embedding gathers, norms, activations, casts, softmax, the optimiser at d = 256), and how
many kernels it takes. This script builds the same iteration (the same world, tokenizer and untrained model:
``bench_rl_iteration.build`` and ``model_for``; the reward through the simulator's truth, as there) and runs its two
phases on the CPU under a ``TorchDispatchMode`` that records every ATen op: its FLOPs (``torch.utils.flop_counter``'s
formulas; scaled-dot-product attention as its two matmuls, 4 x B x H x Tq x Tk x hd forward, twice that backward), its
bytes (every distinct tensor it reads plus every tensor it writes, at the dtype it ran in; a view moves nothing, an
in-place op reads and writes its tensor, a gather reads as many bytes of its source as it returns) and one launch. The phases run for real, so every shape and dtype is the
GPU's (autocast runs bf16 on the CPU too); only the clock is not.

- **update**: ``agents.rl.loop.update``'s step (forward under ``--precision`` autocast, backward, the clip, AdamW) on
  ``--requests`` and on twice as many trained requests of one rollout. Per op, the difference is its cost per request
  and the rest its fixed cost per step (the optimiser, the clip, the parameters' and embedding tables' gradients);
  one iteration is ``--epochs`` x ceil(``--trained`` / ``--minibatch``) steps of ``--minibatch`` requests.
- **rollout**: ``Roller.collect``'s env step (tokens, context, K sampled paths, HTE values, scores, ARR, env step) at
  ``--sessions`` and twice as many sessions (after one uncounted step each): the cost per session and the fixed cost
  per step (catalog- and advertiser-wide work); one iteration is ``--rollout-steps`` steps of ``--rollout-sessions``.

Per op, ``max(FLOPs / peak, bytes / bandwidth)`` is the least time a kernel doing that op alone can take (the
roofline). Summed over one iteration:

- **matmul floor**: every matmul FLOP at the peak (MFU 100%);
- **eager roofline**: every op its own kernel, each at its roofline: the floor of the phase as eager PyTorch runs it;
- **fused roofline**: only the matmuls and the attention, each at its roofline, as if every other op were fused into
  them (their own inputs and outputs still move once): the floor of a perfectly fused phase;
- **launch floor**: the ops (one kernel each, eager) x ``--launch-us``: what launching alone costs a host that
  issues one kernel at a time.

CPU kernels may call other ATen ops than CUDA's for the same module (the attention's kernel, a decomposition): the
tables name the ops seen. Prints the tables and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for the other benchmarks
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.rl.common import LossConfig
from agents.rl.hepo import HEPO
from agents.rl.loop import PathTerms, UpdateConfig, update
from agents.rl.rollout import Roller
from benchmarks.bench_rl_iteration import (
    H200_BF16_DENSE_TFLOPS,
    add_setting_args,
    build,
    model_for,
    rollout_flops_per_request,
    update_flops_per_request,
)
from gpr_sim.model.precision import RESIDUALS, ResidualStream
from gpr_sim.runs import write_json

H200_HBM_GBS = 4800.0
"""NVIDIA H200 SXM HBM3e bandwidth, GB/s (the spec; a copy reaches less: ~3.0 TB/s was measured on the H100's 3.35)"""
MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_grouped_mm"})
"""ATen ops counted as matmuls (GEMMs on tensor cores)"""
GATHERS = frozenset({"embedding", "index", "index_select", "gather", "take", "take_along_dim"})
"""ATen ops whose first tensor is a source they read only the returned rows of"""
ATTENTION = "scaled_dot_product"
"""name fragment of the fused attention ops (forward and backward, any backend)"""
COSTS = ("launches", "flops", "bytes")

Costs = dict[str, dict[str, float]]
"""op name -> {launches, flops, bytes}"""


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def attention_flops(name: str, args) -> float:
    """4 x B x H x Tq x Tk x hd for a forward (QK^T and PV), twice that for a backward."""
    q, k = (args[1], args[2]) if "backward" in name else (args[0], args[1])  # backward: (grad_out, q, k, ...)
    b, h, tq, hd = q.shape
    fwd = 4.0 * b * h * tq * k.shape[-2] * hd
    return 2 * fwd if "backward" in name else fwd


CLASSES = (
    ("cast", ("_to_copy", "copy_")),
    ("norm", ("native_layer_norm",)),
    ("gather", ("embedding", "index", "gather", "take", "scatter")),
    (
        "layout",
        ("cat", "stack", "slice_backward", "select_backward", "clone", "flip", "zeros", "new_zeros", "fill"),
    ),
)
"""the non-matmul ops by what they do, by name prefix (the rest: element-wise and reductions)"""


def kind(name: str) -> str:
    if name in MATMULS:
        return "matmul"
    return "attention" if ATTENTION in name else "other"


def op_class(name: str) -> str:
    """``kind``, with the other ops split by ``CLASSES`` (the rest: "element-wise")."""
    k = kind(name)
    if k != "other":
        return k
    return next((c for c, prefixes in CLASSES if name.startswith(prefixes)), "element-wise")


def class_table(ops: Costs, bandwidth: float) -> str:
    """The phase's bytes by ``op_class``: what fusing or retyping each would save at most."""
    by: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COSTS, 0.0))
    for name, o in ops.items():
        for key in COSTS:
            by[op_class(name)][key] += o[key]
    total = sum(o["bytes"] for o in by.values())
    lines = [
        "| class | launches | TB | share of bytes | seconds at the bandwidth |",
        "|---|---:|---:|---:|---:|",
    ]
    for c, o in sorted(by.items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(
            f"| {c} | {o['launches']:,.0f} | {o['bytes'] / 1e12:.2f} | {o['bytes'] / total:.0%} | "
            f"{o['bytes'] / bandwidth:.3f} |"
        )
    return "\n".join(lines)


OUTSIDE = "(outside the model: loss, targets, clip, optimiser, env)"
"""``model_part`` of an op no module of the model ran"""
BACKWARD = "(backward: not attributed)"
"""the part of every backward op: the tracker's backward hooks fire per module, but the backward of code outside a
module (the loss, the functional teacher-forced pass) runs after the last hook and would land in that module"""


def model_part(module: str) -> str:
    """The part of the model a module path (``torch.utils.module_tracker``'s, e.g.
    ``PathTerms.model.hsd.blocks.0.ffn.mlps.1.fc`` or ``GPRModel.ptd.thinking.kv``) belongs to: its names below the
    root and the model, without indices, two deep (``ptd.thinking``), three in the blocks (``hsd.blocks.ffn``); a root
    or the model itself running its own code: ``NAME (its own code)``; no module: ``OUTSIDE``."""
    names = module.split(".")
    if names in ([""], ["Global"]):
        return OUTSIDE
    inner = [n for n in names[1:] if not n.isdigit() and n != "model"]
    if not inner:
        return f"{names[-1]} (its own code)"
    return ".".join(inner[: 3 if inner[1:2] == ["blocks"] else 2])


class OpCounter(TorchDispatchMode):
    """Records, per ATen op and per model part (``model_part`` of the innermost module ``tracker`` says is running;
    every backward op in ``BACKWARD``), the launches, FLOPs and bytes read and written (module doc) of what runs inside it."""

    def __init__(self, tracker: ModuleTracker | None = None) -> None:
        super().__init__()
        self.tracker = tracker
        self.ops: Costs = defaultdict(lambda: dict.fromkeys(COSTS, 0.0))
        self.parts: Costs = defaultdict(lambda: dict.fromkeys(COSTS, 0.0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        seen: set[int] = set()
        read = 0
        for i, t in enumerate(inputs):
            ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if ptr not in seen:
                seen.add(ptr)
                # a gather reads the rows it returns, not its whole source (the embedding table, the catalog)
                source = i == 0 and name in GATHERS and outputs
                read += min(tensor_bytes(t), tensor_bytes(outputs[0])) if source else tensor_bytes(t)
        in_place = name.endswith("_") or "out" in kwargs
        aliased = all(t.numel() == 0 or t.untyped_storage().data_ptr() in seen for t in outputs)
        if aliased and not in_place:
            return out  # a view, or metadata: no kernel, no traffic
        if ATTENTION in name:
            flops = attention_flops(name, args)
        elif func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        else:
            flops = 0.0
        moved = read + sum(tensor_bytes(t) for t in outputs)
        module = max(self.tracker.parents, key=lambda m: m.count(".")) if self.tracker else ""
        part = BACKWARD if self.tracker and self.tracker.is_bw else model_part(module)
        for row in (self.ops[name], self.parts[part]):
            row["launches"] += 1
            row["flops"] += flops
            row["bytes"] += moved
        return out


def counted(fn, model: torch.nn.Module) -> dict[str, Costs]:
    """``fn()`` counted: ``{"ops": by ATen op, "parts": by model part}``. The tracker learns the model's module names
    first: a module it meets first outside its parent's forward (the rollout calls ``model.hsd`` directly) would
    otherwise be named after its type alone."""
    with ModuleTracker() as tracker, OpCounter(tracker) as counter:
        tracker._get_mod_name(model)  # names every submodule GPRModel.<path> (torch's own helper)
        fn()
    return {"ops": dict(counter.ops), "parts": dict(counter.parts)}


def fit(small: Costs, large: Costs, n: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per op and cost, (per unit, fixed) from its counts at ``n`` and ``2 n`` units: the slope and the intercept of
    the line through them (each clipped at 0)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in small.keys() | large.keys():
        row = {}
        for key in COSTS:
            a, b = small.get(name, {}).get(key, 0.0), large.get(name, {}).get(key, 0.0)
            slope = max((b - a) / n, 0.0)
            row[key] = (slope, max(a - slope * n, 0.0))
        out[name] = row
    return out


def scale(line: dict[str, dict[str, tuple[float, float]]], units: int, calls: int) -> Costs:
    """One phase of one iteration: ``calls`` calls of ``units`` units each."""
    return {
        name: {key: calls * (slope * units + fixed) for key, (slope, fixed) in row.items()}
        for name, row in line.items()
    }


def floors(ops: Costs, peak: float, bandwidth: float, launch_s: float) -> dict[str, float]:
    """The phase's floors in seconds (module doc), its totals and its bytes outside the matmuls and attention."""

    def roof(o: dict[str, float]) -> float:
        return max(o["flops"] / peak, o["bytes"] / bandwidth)

    total = {key: sum(o[key] for o in ops.values()) for key in COSTS}
    return {
        **total,
        "other_bytes": sum(o["bytes"] for n, o in ops.items() if kind(n) == "other"),
        "matmul_floor_s": total["flops"] / peak,
        "bytes_floor_s": total["bytes"] / bandwidth,
        "eager_roofline_s": sum(roof(o) for o in ops.values()),
        "fused_roofline_s": sum(roof(o) for n, o in ops.items() if kind(n) != "other"),
        "launch_floor_s": total["launches"] * launch_s,
    }


def count_update(args, model, buf) -> tuple[dict[str, Costs], dict[str, Costs]]:
    """One update step on ``args.requests`` and on ``2 x args.requests`` trained requests of ``buf``, each a first
    step of a fresh AdamW."""
    loss_cfg = LossConfig()
    buf.adv, buf.returns = HEPO.targets(buf, loss_cfg)
    valid = torch.nonzero(buf.valid).squeeze(1)
    if valid.numel() < 2 * args.requests:
        raise SystemExit(
            f"error: the rollout has {valid.numel()} trained requests, fewer than 2 x --requests {args.requests}: "
            "raise --sessions"
        )
    model.train()

    def step(n: int):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        schedule = UpdateConfig(1, n, 1.0, 0, args.precision)
        return lambda: update(
            PathTerms(model), model, opt, None, buf.rows(valid[:n]), HEPO, loss_cfg, schedule, 0
        )

    return counted(step(args.requests), model), counted(step(2 * args.requests), model)


def count_rollout(args, sessions: int):
    """One rollout env step of ``sessions`` sessions, counted after an uncounted one (the reward scale and the
    first step's tables); returns the counts, the model and a buffer of that first step."""
    torch.manual_seed(0)
    env, tok = build(args, sessions)
    model = model_for(args, env, tok).eval()
    roller = Roller(env, tok, args.group_size, "truth", args.arr_rate, 0, precision=args.precision)
    buf, _ = roller.collect(model, 1)
    return counted(lambda: roller.collect(model, 1), model), model, buf


def op_table(ops: Costs, peak: float, bandwidth: float, rows: int) -> str:
    """The ops by their roofline seconds, largest first."""
    lines = [
        "| op | kind | launches | GFLOP | GB | FLOP / byte | roofline ms | bound |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    ranked = sorted(ops.items(), key=lambda kv: -max(kv[1]["flops"] / peak, kv[1]["bytes"] / bandwidth))
    for name, o in ranked[:rows]:
        f, b = o["flops"], o["bytes"]
        bound = "compute" if f / peak >= b / bandwidth else "memory"
        lines.append(
            f"| {name} | {kind(name)} | {o['launches']:,.0f} | {f / 1e9:,.1f} | {b / 1e9:,.2f} | "
            f"{f / b if b else 0:.0f} | {max(f / peak, b / bandwidth) * 1e3:.2f} | {bound} |"
        )
    return "\n".join(lines)


def part_table(parts: Costs, peak: float, bandwidth: float, rows: int) -> str:
    """The model's parts (``model_part``; their forward ops, the backward in one row) by their bytes, largest first:
    where fusing would pay."""
    total = sum(o["bytes"] for o in parts.values())
    lines = [
        "| part | launches | TFLOP | TB | share of bytes | seconds at the bandwidth | FLOP / byte |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, o in sorted(parts.items(), key=lambda kv: -kv[1]["bytes"])[:rows]:
        lines.append(
            f"| {name} | {o['launches']:,.0f} | {o['flops'] / 1e12:.1f} | {o['bytes'] / 1e12:.2f} | "
            f"{o['bytes'] / total:.0%} | {o['bytes'] / bandwidth:.3f} | {o['flops'] / max(o['bytes'], 1):.0f} |"
        )
    return "\n".join(lines)


def floors_table(title: str, f: dict[str, float], args, measured: float) -> str:
    mfu = lambda s: f"{f['matmul_floor_s'] / s:.0%}" if f["flops"] and s > 0 else "-"  # noqa: E731
    lines = [
        f"| {title} | seconds | MFU it allows |",
        "|---|---:|---:|",
        f"| matmul floor ({f['flops'] / 1e12:,.1f} TFLOP at {args.peak_tflops:g} TFLOP/s) | "
        f"{f['matmul_floor_s']:.3f} | {mfu(f['matmul_floor_s'])} |",
        f"| bytes floor ({f['bytes'] / 1e12:.2f} TB at {args.bandwidth_gbs:,.0f} GB/s; "
        f"{f['other_bytes'] / f['bytes']:.0%} outside matmuls and attention) | {f['bytes_floor_s']:.3f} | |",
        f"| eager roofline (every op its own kernel) | {f['eager_roofline_s']:.3f} | {mfu(f['eager_roofline_s'])} |",
        f"| fused roofline (matmuls and attention only) | {f['fused_roofline_s']:.3f} | "
        f"{mfu(f['fused_roofline_s'])} |",
        f"| launch floor ({f['launches']:,.0f} eager kernels x {args.launch_us:g} us) | {f['launch_floor_s']:.3f} | |",
    ]
    if measured > 0:
        lines.append(f"| measured | {measured:.3f} | {mfu(measured)} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sessions", type=int, default=16, help="sessions of the counted rollout (and twice as many)"
    )
    p.add_argument(
        "--requests", type=int, default=8, help="trained requests of the counted update step (and 2x)"
    )
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument(
        "--residual",
        default="fp32",
        choices=RESIDUALS,
        help="ResidualStream.dtype: the blocks' residual stream under bf16 in fp32 (the library's) or in bf16 (compute)",
    )
    add_setting_args(p)
    p.add_argument("--rollout-sessions", type=int, default=8192, help="sessions of the projected iteration")
    p.add_argument("--rollout-steps", type=int, default=2, help="env steps of the projected iteration")
    p.add_argument(
        "--trained",
        type=int,
        default=21_800,
        help="trained requests of the projected iteration (bench_rl_iteration at 8,192 sessions x 2 steps, the "
        "rehearsed ones included)",
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=1024, help="requests per optimiser step")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="matmul peak, TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=float, default=H200_HBM_GBS, help="memory bandwidth, GB/s")
    p.add_argument("--launch-us", type=float, default=4.0, help="host microseconds per eager kernel launch")
    p.add_argument("--measured-rollout-s", type=float, default=0.0, help="a measured rollout's seconds")
    p.add_argument("--measured-update-s", type=float, default=0.0, help="a measured update's seconds")
    p.add_argument("--rows", type=int, default=15, help="ops per printed table")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="benchmarks/results/roofline_rl_iteration.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    for name in (
        "sessions",
        "requests",
        "rollout_sessions",
        "rollout_steps",
        "trained",
        "epochs",
        "minibatch",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("peak_tflops", "bandwidth_gbs", "launch_us"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    args.device = "cpu"
    ResidualStream.dtype = args.residual
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    peak, bw, launch = args.peak_tflops * 1e12, args.bandwidth_gbs * 1e9, args.launch_us * 1e-6

    small, model, buf = count_rollout(args, args.sessions)
    large, _, _ = count_rollout(args, 2 * args.sessions)
    steps = args.epochs * math.ceil(args.trained / args.minibatch)
    one, two = count_update(args, model, buf)
    rollout, upd = {}, {}
    for view in ("ops", "parts"):  # the same counts by ATen op and by model part
        rollout[view] = scale(
            fit(small[view], large[view], args.sessions), args.rollout_sessions, args.rollout_steps
        )
        line = fit(one[view], two[view], args.requests)
        # per epoch, full minibatches and one with the rest: exactly --trained requests
        full, rest = divmod(args.trained, args.minibatch)
        upd[view] = scale(line, args.minibatch, args.epochs * full)
        if rest:
            last = scale(line, rest, args.epochs)
            upd[view] = {n: {key: upd[view][n][key] + last[n][key] for key in COSTS} for n in upd[view]}

    cfg, seq_len, k = model.cfg, model.cfg.max_len, args.group_size
    formula = {
        "update_flops": update_flops_per_request(cfg, seq_len, k, True) * args.trained * args.epochs,
        "rollout_flops_per_request": rollout_flops_per_request(cfg, seq_len, k, True),
    }
    result = {"args": vars(args), "seq_len": seq_len, "params": sum(q.numel() for q in model.parameters())}
    print(
        f"T = {seq_len}, K = {k}, d = {cfg.d_model} x {cfg.n_layers} layers ({result['params'] / 1e6:.2f}M "
        f"parameters), {args.precision}; one iteration: rollout {args.rollout_steps} steps x "
        f"{args.rollout_sessions:,} sessions, update {steps} steps of <= {args.minibatch:,} of {args.trained:,} "
        f"trained requests x {args.epochs} epochs"
    )
    for phase, counts, measured in (
        ("rollout", rollout, args.measured_rollout_s),
        ("update", upd, args.measured_update_s),
    ):
        ops = counts["ops"]
        f = floors(ops, peak, bw, launch)
        print(f"\n{phase}, by op (one iteration):\n{op_table(ops, peak, bw, args.rows)}")
        print(f"\n{phase}, bytes by class:\n{class_table(ops, bw)}")
        print(
            f"\n{phase}, by model part (forward ops; the backward's in one row):\n"
            f"{part_table(counts['parts'], peak, bw, args.rows)}"
        )
        print(f"\n{floors_table(f'{phase} (one iteration)', f, args, measured)}")
        result[phase] = {"ops": ops, "parts": counts["parts"], "floors": f, "measured_s": measured or None}
    result["update"]["formula_flops"] = formula["update_flops"]
    result["rollout"]["formula_flops_per_request"] = formula["rollout_flops_per_request"]
    print(
        f"\nupdate matmul FLOPs counted {result['update']['floors']['flops'] / 1e12:.1f} T, "
        f"bench_rl_iteration's formula {formula['update_flops'] / 1e12:.1f} T"
    )
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
