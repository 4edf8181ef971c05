"""One RL iteration of HEPO end to end: rollout (K sampled paths scored) + targets + update, timed.

    python benchmarks/bench_rl_iteration.py --device cpu --sessions 4 --history 3 --d-model 16 --n-layers 1 \\
        --group-size 4 --ads 60 --organic 80 --users 100 --advertisers 6 --minibatch 4 --iters 1   # smoke
    python benchmarks/bench_rl_iteration.py --device cuda --sessions 4096,16384 --precision fp32,bf16 --old

What runs is the library's training iteration (``agents.hepo``'s loop body, no evaluation): ``Roller.collect``
(``--rollout-steps`` env steps of N sessions: tokens -> HSD context -> K sampled paths on the trie ->
HTE values of every prefix -> simulator scores, budgets, process rewards, ARR requests) -> ``HEPO.targets``
-> ``loop.update`` (``--epochs`` x minibatches of ``--minibatch`` requests, each with its K paths: forward,
backward, AdamW). The model is ``GPRConfig`` at ``--d-model`` x ``--n-layers`` (default the library's
d=256 x 4), untrained (the speed of an iteration does not depend on the weights); the world is the small
preset with its histories set (the ad history filled from the start) so that T = 2 + 2 ``--history``
(default 127: T = 256), and the market sizes of the flags; the tokenizer is RQ-Kmeans fitted on that world.

Rows (one per sessions x precision x path): ``path`` = ``cached`` (the library default: the PTD decodes the
context once per request, sampling and the update's teacher-forced pass read its K/V) or ``old`` (``--old``:
the full-forward reference, ``Roller(cached=False)`` and ``PathTerms(cached=False)``: the context repeated
for every path and level); ``precision`` = fp32 (reference) or bf16 (autocast, ``UpdateConfig.precision``);
and per compiled path the ``--compile``, ``--optimizer``, ``--ffn-layout`` and ``--gemm-autotune`` values given
(each row compiles afresh: ``torch._dynamo.reset()``, so Inductor's GEMM autotuning applies to its graphs only).
Each row: ``--warmup`` untimed iterations, then ``--iters`` timed ones (medians reported).

Columns:
- requests/iteration: real requests N x steps (+ rehearsed, trained on as well); valid = with an eligible ad
  (the update trains on valid requests only).
- requests/s end to end = real requests / (rollout + targets + update seconds) (``agents.hepo``'s
  ``perf/requests_per_s``).
- update FLOPs per request (``update_flops_per_request``, forward + backward of one trained request with its
  K paths, one epoch): 3 x the forward's matmul FLOPs, forward =
    HSD    T x 2 x F x d                               [the dense features' input projection, F = dense_dim]
           + T x 2 x n_layers x (5 d^2 + 2 f d^2)      [qkvu 4d^2 + out d^2; one type's FFN 2 f d^2]
           + n_layers x 4 x T^2 x d                    [attention QK^T and PV over all T x T, as SDPA with a mask]
    think  T x 2 x 2 d^2 + 4 Kt T d + Kt x 2 x (2 d^2 + 2 f d^2)
    refine S x 2 x (6 d^2 + 2 d^2)                     [S denoising steps of the 3d -> 2d -> d MLP]
    PTD    Cc x 2 x (d^2 + D (4 d^2 + 2 f d^2))        [MTP adapter, the context once per request]
           + K L' x 2 x D (4 d^2 + 2 f d^2) + K x 2 x d x sum(K_l)   [cached: only the paths' tokens; heads]
           (old path: K (Cc + L') tokens per request through the D blocks instead of Cc + K L')
    HTE    (1 + K L') x 2 x (2 f d^2 + d) + 2 d^2
  with f = ffn_mult, Kt thinking tokens, Cc = Kt + 1 context tokens, D decoder layers, L' levels. "6 x params x
  tokens" is this sum with the attention terms added; embeddings, norms, softmax and element-wise work are
  not counted (they cost bandwidth, not matmul FLOPs).
- update TFLOP/s = epochs x trained requests x FLOPs per request / update seconds; MFU = that over
  ``--peak-tflops`` (H200 dense bf16: 989; for the fp32 rows the same peak is used, so their MFU reads
  against what bf16 could do).
- rollout TFLOP/s: the forward FLOPs of the rollout's model calls (HSD, thinking, refiner, PTD per level,
  HTE; same terms, ``rollout_flops_per_request``) over the rollout seconds (which include the env step and
  scoring).
- peak GiB: ``torch.cuda.max_memory_allocated`` over the row (CUDA), else the process's peak RSS.
- ``--profile R``: one more iteration per row under ``torch.profiler`` (phases labelled ``rollout``,
  ``targets``, ``update``); the top R ops by self device time (CPU: self CPU time) are printed and kept in
  the row's ``profile``. On CUDA the row also gets ``busy``: per phase, the seconds during which at least one
  kernel ran (the union of the kernels' intervals inside the phase, ``busy_seconds``) and that over the phase's
  median unprofiled seconds. A phase the GPU is busy for most of is bound by its kernels; one it is idle for
  most of is bound by the host (launches, Python, syncs), and more work per launch is what speeds it up: three
  RL runs side by side reached 2.3x one run's requests/s on an H200 (RESULTS "RL at GPU scale past its first
  iterations"). Kernel durations are not stretched by the profiler, so over unprofiled time the ratio holds.
  The row's ``rollout_split`` says where the rollout went, by the ``Roller``'s labels (``ROLLOUT_PARTS``: tokens,
  sampling, scoring (of which the truth monitor), rehearsal, env step), and on CUDA ``kernel_seconds``: per phase, its
  kernels' device seconds by class (GEMMs, attention, Triton-fused, element-wise, norms, gathers, copies, the
  optimiser; ``KERNEL_CLASSES``), to read against ``benchmarks/roofline_rl_iteration.py``'s floors per class: the host's seconds in each and, on CUDA, its kernels' busy seconds
  (``rollout_split``), of the profiled iteration (the profiler's overhead included on the host side).

Prints a table and writes JSON to ``--out`` (after every row, so a run cut short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agents.cli import run_main  # noqa: E402
from agents.rl import loop, rollout  # noqa: E402
from agents.rl.common import LossConfig  # noqa: E402
from agents.rl.hepo import HEPO  # noqa: E402
from agents.rl.loop import COMPILE_MODES, PathTerms, UpdateConfig, update  # noqa: E402
from agents.rl.rollout import Roller  # noqa: E402
from envs import make_vec_env  # noqa: E402
from gpr_sim.model import (  # noqa: E402
    GPRConfig,
    GPRModel,
    hsd,  # noqa: E402
)
from gpr_sim.model.hsd import HSD, TypedFFN, TypedLayerNorm  # noqa: E402
from gpr_sim.model.precision import PRECISIONS, RESIDUALS, ResidualStream  # noqa: E402
from gpr_sim.runs import write_json  # noqa: E402
from gpr_sim.schema import SchemaConfig, tokens_from_obs  # noqa: E402
from gpr_sim.tokenizer.compare import CompareConfig  # noqa: E402
from gpr_sim.tokenizer.world import fit_world_tokenizer  # noqa: E402
from gpr_sim.world import preset  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA H200 SXM dense bf16 tensor-core peak (no sparsity), TFLOP/s"""


PHASES = ("rollout", "targets", "update")
"""the labelled phases of one iteration (``record_function``), each ending with a device sync"""


def busy_seconds(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """Length of the union of ``intervals`` (start, end) clipped to ``window``, in their units: the time at
    least one of them (kernels) was running, however many overlapped."""
    lo, hi = window
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def kernel_intervals(events) -> list[tuple[float, float]]:
    """(start, end) of every CUDA kernel (or copy) of a profiler trace: its device events less the device-side
    copies of the labels (user annotations spanning a labelled range, not kernels)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == cuda
        and not getattr(e, "is_user_annotation", False)
        and e.name not in PHASES + ROLLOUT_PARTS
    ]


ROLLOUT_PARTS = (
    "rollout/tokens",
    "rollout/sample",
    "rollout/score",
    "rollout/monitor",
    "rollout/rehearse",
    "rollout/env_step",
)
"""the rollout's own labels (``agents.rl.rollout.Roller``): observation -> tokens; context, K sampled paths and HTE
values; scoring, budgets and the truth monitor; of the scoring, the truth monitor's own scoring of the same ads
(a privileged diagnostic, nested in ``rollout/score``: not to be added to it); the rehearsed requests' world step
ahead; the env step. Each occurs once per env step (rehearsal: per step that rehearses), none ends with a sync."""


def rollout_split(prof) -> dict[str, float]:
    """Seconds per ``ROLLOUT_PARTS`` label over the profiled iteration, summed over its occurrences: ``host_s``, the
    host's time inside the label (CPU events); on CUDA also ``device_s``, the time a kernel launched inside the
    label ran (``busy_seconds`` of the kernels within the label's device-side range, which the profiler records
    from its first kernel's start to its last one's end, so an asynchronous launch is counted where it ran, not
    where the host was). Labels absent from the trace are absent here."""
    events = prof.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernels = kernel_intervals(events)
    out: dict[str, float] = {}
    for e in events:
        if e.name not in ROLLOUT_PARTS or e.device_type not in (cpu, cuda):
            continue
        window = (e.time_range.start, e.time_range.end)
        if e.device_type == cpu:
            key, seconds = f"{e.name}/host_s", (window[1] - window[0]) / 1e6  # us -> s
        else:
            key, seconds = f"{e.name}/device_s", busy_seconds(kernels, window) / 1e6
        out[key] = out.get(key, 0.0) + seconds
    return out


def phase_windows(events) -> dict[str, tuple[float, float]]:
    """The host window (start, end, us) of each ``PHASES`` label of a trace, its first occurrence: each phase ends
    with a sync, so the kernels it launched ran inside it."""
    cpu = torch.autograd.DeviceType.CPU
    windows: dict[str, tuple[float, float]] = {}
    for e in events:
        if e.name in PHASES and e.device_type == cpu and e.name not in windows:
            windows[e.name] = (e.time_range.start, e.time_range.end)
    return windows


def device_busy(prof) -> dict[str, float] | None:
    """Seconds per phase during which a CUDA kernel (or copy) ran (``busy_seconds`` of the device events inside
    the phase's host window: each phase ends with a sync, so its kernels ran inside it); None when the trace
    has none. The device-side copies of the phase labels (user annotations spanning the whole range) are not
    kernels and are left out."""
    events = prof.events()
    kernels = kernel_intervals(events)
    if not kernels:
        return None
    return {
        phase: busy_seconds(kernels, window) / 1e6 for phase, window in phase_windows(events).items()
    }  # s


KERNEL_CLASSES = (
    ("gemm (triton template)", ("triton_tem",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "cublas", "xmma", "matmul", "s16816", "sm90")),
    ("fused (triton)", ("triton_",)),
    ("optimiser", ("adam", "multi_tensor")),
    ("gather / scatter", ("index", "gather", "scatter", "embedding")),
    ("norm / softmax / reduction", ("norm", "softmax", "reduce", "cumsum", "sort", "topk")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat")),
    ("element-wise (aten)", ("elementwise", "vectorized", "unrolled")),
)
"""CUDA kernel names (lowercased) -> a class, first match wins; the rest is "other". The classes follow
``benchmarks/roofline_rl_iteration.py``'s op classes, so a phase's device seconds per class can be read against
that class's floor in bytes."""


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def kernel_seconds(prof) -> dict[str, dict[str, float]]:
    """Per phase (``PHASES``), the device seconds of its kernels by ``kernel_class`` (each kernel counted in the
    phase whose host window holds its start: each phase ends with a sync), largest first; empty without CUDA
    kernels."""
    events = prof.events()
    cuda = torch.autograd.DeviceType.CUDA
    windows = phase_windows(events)
    out: dict[str, dict[str, float]] = {phase: {} for phase in windows}
    for e in events:
        if (
            e.device_type != cuda
            or getattr(e, "is_user_annotation", False)
            or e.name in PHASES + ROLLOUT_PARTS
        ):
            continue
        for phase, (a, b) in windows.items():
            if a <= e.time_range.start < b:
                key = kernel_class(e.name)
                out[phase][key] = out[phase].get(key, 0.0) + (e.time_range.end - e.time_range.start) / 1e6
                break
    return {p: dict(sorted(v.items(), key=lambda kv: -kv[1])) for p, v in out.items() if v}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -- FLOPs ------------------------------------------------------------------------------------------
def forward_flops(
    cfg: GPRConfig, seq_len: int, group_size: int, ptd_tokens: float, trunk: bool = True
) -> float:
    """Matmul FLOPs of one request's forward (module doc's formula).

    Args:
        cfg: the model.
        seq_len: T.
        group_size: K paths of the request.
        ptd_tokens: generated tokens through the PTD blocks per request (context tokens counted apart).
        trunk: count the HSD, thinking and refiner (False: the PTD and HTE only).
    """
    d, f, t, k, lp = cfg.d_model, cfg.ffn_mult, seq_len, group_size, cfg.path_len
    kt, dec = cfg.num_thinking, cfg.decoder_layers
    cc = kt + (1 if cfg.refining else 0)
    block = 4 * d * d + 2 * f * d * d  # one PTD decoder block per token (qkv 3d^2 + out d^2 + MLP)
    out = 0.0
    if trunk:
        out += t * 2 * cfg.dense_dim * d  # the dense features' input projection
        out += t * 2 * cfg.n_layers * (5 * d * d + 2 * f * d * d) + cfg.n_layers * 4 * t * t * d
        out += t * 2 * 2 * d * d + 4 * kt * t * d + kt * 2 * (2 * d * d + 2 * f * d * d)
        out += cfg.refine_steps * 2 * (6 * d * d + 2 * d * d) if cfg.refining else 0
    out += cc * 2 * (d * d + dec * block)  # MTP head-0 adapter + the context through the decoder
    out += ptd_tokens * 2 * dec * block + k * 2 * d * sum(cfg.level_sizes)
    out += (1 + k * lp) * 2 * (2 * f * d * d + d) + 2 * d * d  # HTE
    return out


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (``torch._dynamo``'s ``unique_graphs`` counter): a
    timed iteration that raises it spent part of its seconds compiling (a recompile for a new batch size or grad
    mode), and its row is not a measurement of the steady state."""
    return int(counters["stats"]["unique_graphs"])


def update_flops_per_request(cfg: GPRConfig, seq_len: int, group_size: int, cached: bool) -> float:
    """Forward + backward (3 x forward) of one trained request and its K paths (module doc)."""
    cc = cfg.num_thinking + (1 if cfg.refining else 0)
    k, lp = group_size, cfg.path_len
    # old path: every path repeats the context tokens (their K/V included) through the decoder
    ptd = k * lp if cached else k * (cc + lp) - cc
    return 3 * forward_flops(cfg, seq_len, k, ptd)


def rollout_flops_per_request(cfg: GPRConfig, seq_len: int, group_size: int, cached: bool) -> float:
    """Forward of one rollout request: context, L' sampling levels over K paths, HTE values.

    Level l scores its prefixes once per request at level 0 and once per path after: cached, l + 1 generated
    tokens through the decoder, the last block computing K/V for all of them but its output for the last
    token only (``last_only``); old, Cc + l + 1 tokens through every block in full.
    """
    d, f, k, dec = cfg.d_model, cfg.ffn_mult, group_size, cfg.decoder_layers
    cc = cfg.num_thinking + (1 if cfg.refining else 0)
    qkv, rest = 2 * 3 * d * d, 2 * (d * d + 2 * f * d * d)  # per token: projections; out + MLP
    sampling = 0.0
    for lvl, size in enumerate(cfg.level_sizes):
        rows = 1 if lvl == 0 else k
        if cached:
            tokens = lvl + 1
            per_row = (dec - 1) * tokens * (qkv + rest) + tokens * qkv + rest
        else:
            per_row = dec * (cc + lvl + 1) * (qkv + rest)
        sampling += rows * (per_row + 2 * d * size)
    base = forward_flops(cfg, seq_len, k, 0) - k * 2 * d * sum(cfg.level_sizes)  # trunk, context, HTE
    if not cached:  # no separate context pass: the context tokens go through the decoder per path above
        base -= cc * 2 * dec * (4 * d * d + 2 * f * d * d)
    return base + sampling


# -- one configuration ------------------------------------------------------------------------------
def build(args, sessions: int):
    """Env of ``sessions`` sessions, tokenizer fitted on its world, and the untrained model."""
    world = preset(
        "small",
        organic_history=args.history,
        ad_history=args.history,
        initial_ad_history=args.history,  # a full history: T real tokens, not mostly padding
        num_ads=args.ads,
        num_organic=args.organic,
        num_users=args.users,
        num_advertisers=args.advertisers,
    )
    env = make_vec_env("ads-v0", sessions, config=world, device=args.device, validate_actions=False)
    tok = fit_world_tokenizer(
        env.unwrapped.world,
        "rq-kmeans",
        CompareConfig(num_levels=args.levels, codebook_size=args.codebook, kmeans_iters=args.kmeans_iters),
        seed=0,
    )
    return env, tok


def model_for(args, env, tok) -> GPRModel:
    schema = SchemaConfig.from_world(env.unwrapped.config)
    obs, _ = env.reset(seed=0)
    # the dense width of the live token layout (whatever features the schema puts on U/E tokens)
    dense = tokens_from_obs(obs, tok.table, schema, check=False).dense_features.shape[-1]
    cfg = GPRConfig(
        level_sizes=tuple(tok.level_sizes),
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        dense_dim=dense,
        max_len=schema.seq_len,
    )
    torch.manual_seed(0)
    return GPRModel(cfg).to(args.device)


def run_row(
    args,
    sessions: int,
    precision: str,
    cached: bool,
    compile_mode: str = "off",
    fused: bool = False,
    ffn_layout: str = "segments",
    gemm_autotune: bool = False,
    ln_affine: str = "slot",
    embed: str = "eager",
    residual: str = "fp32",
    epochs: int = 2,
) -> dict:
    dev = torch.device(args.device)
    # Inductor's GEMM autotuning (Triton / C++ templates with fused epilogues raced against the vendor
    # library) is read when a graph compiles: the row starts from no compiled graph so it applies to all
    torch._dynamo.reset()
    inductor_config.max_autotune_gemm = gemm_autotune
    # "sort": the rollout and the update do not read the slot layout, so the typed FFN sorts the tokens by type
    layout_of = hsd.type_segments if ffn_layout == "segments" else lambda type_ids: None
    loop.type_segments = rollout.type_segments = layout_of
    TypedLayerNorm.by_slot = ln_affine == "slot"  # "token": the typed norms gather (B, T, C) gains and biases
    HSD.bag_embed = embed  # where the small embedding tables are summed by one bag (HSD.bag_embed)
    ResidualStream.dtype = residual  # the blocks' residual stream under autocast: its dtype (ResidualStream)
    env, tok = build(args, sessions)
    model = model_for(args, env, tok)
    seq_len = model.cfg.max_len
    roller = Roller(env, tok, args.group_size, "truth", args.arr_rate, 0, precision=precision, cached=cached)
    if ffn_layout == "sort":
        roller.segments = None  # the layout read per batch: layout_of above, which reads none
    # fused: agents.hepo's optimiser on CUDA; update() then checks finiteness on the device (no sync per step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=fused)
    loss_cfg = LossConfig()
    schedule = UpdateConfig(epochs, args.minibatch, 1.0, 0, precision)
    terms_fn = PathTerms(model, cached=cached, compile=compile_mode)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times: list[tuple[float, float, float]] = []
    counts = None

    def iteration(it: int) -> tuple[float, float, float, tuple[int, int, int]]:
        sync(dev)
        t0 = time.perf_counter()
        with record_function("rollout"):
            model.eval()
            buf, stats = roller.collect(model, args.rollout_steps)
            sync(dev)
        t1 = time.perf_counter()
        with record_function("targets"):
            model.train()
            buf.adv, buf.returns = HEPO.targets(buf, loss_cfg)
            sync(dev)
        t2 = time.perf_counter()
        with record_function("update"):
            update(terms_fn, model, opt, None, buf, HEPO, loss_cfg, schedule, it)
            sync(dev)
        t3 = time.perf_counter()
        counts = (stats["rollout/requests"], stats["rollout/rehearsed"], int(buf.valid.sum()))
        return t1 - t0, t2 - t1, t3 - t2, counts

    # graphs torch.compile builds inside the timed iterations: their seconds are partly compile time
    compiled_when_timed = 0
    for it in range(args.warmup + args.iters):
        graphs = compiled_graphs()
        *phases, counts = iteration(it)
        if it >= args.warmup:
            times.append(tuple(phases))
            compiled_when_timed += compiled_graphs() - graphs
    if compiled_when_timed:
        print(
            f"warning: the timed iterations compiled {compiled_when_timed} graph(s), so their seconds include "
            f"compilation: raise --warmup (now {args.warmup})"
        )
    profile_table, busy, split, classes = None, None, None, None
    if args.profile:  # one more iteration under the profiler: where the time goes, by kernel / op
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            iteration(args.warmup + args.iters)
        key = (
            "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        )  # the kernels themselves
        profile_table = prof.key_averages().table(sort_by=key, row_limit=args.profile)
        print(f"profile: sessions {sessions}, {precision}, {'cached' if cached else 'old'}\n{profile_table}")
        busy = device_busy(prof) if dev.type == "cuda" else None
        split = rollout_split(prof)
        classes = kernel_seconds(prof)
        for phase, seconds in classes.items():
            print(f"{phase} kernels by class: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items()))
        print("rollout by part: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    rollout_s, targets_s, update_s = (statistics.median(x) for x in zip(*times))
    if busy is not None:
        medians = dict(zip(PHASES, (rollout_s, targets_s, update_s)))
        busy = {
            **{f"{k}_s": v for k, v in busy.items()},
            **{f"{k}_fraction": v / medians[k] for k, v in busy.items() if medians[k] > 0},
        }
        print("device busy: " + ", ".join(f"{k} {v:.3f}" for k, v in busy.items()))
    real, rehearsed, valid = counts
    total = rollout_s + targets_s + update_s
    upd = update_flops_per_request(model.cfg, seq_len, args.group_size, cached)
    rol = rollout_flops_per_request(model.cfg, seq_len, args.group_size, cached)
    upd_tflops = epochs * valid * upd / update_s / 1e12
    row = {
        "sessions": sessions,
        "precision": precision,
        "compiled_when_timed": compiled_when_timed,
        "path": "cached" if cached else "old",
        "compile": compile_mode,
        "optimizer": "fused" if fused else "foreach",
        "ffn_layout": ffn_layout,
        "gemm_autotune": gemm_autotune,
        "ln_affine": ln_affine,
        "embed": embed,
        "residual": residual,
        "epochs": epochs,
        "seq_len": seq_len,
        "requests": real,
        "rehearsed": rehearsed,
        "valid": valid,
        "rollout_s": rollout_s,
        "targets_s": targets_s,
        "update_s": update_s,
        "eval_s": 0.0,
        "requests_per_s": real / total,
        "update_requests_per_s": epochs * valid / update_s,
        "update_flops_per_request": upd,
        "update_tflops": upd_tflops,
        "update_mfu": upd_tflops / args.peak_tflops,
        "rollout_flops_per_request": rol,
        "rollout_tflops": (real + rehearsed) * rol / rollout_s / 1e12,
        "peak_gib": peak_gib(dev),
        "params": sum(p.numel() for p in model.parameters()),
        "profile": profile_table,
        "busy": busy,
        "rollout_split": split,
        "kernel_seconds": classes,
    }
    return row


def path_label(row: dict) -> str:
    """``cached`` / ``old``, with ``+compile MODE``, ``+fused`` and ``+gemm autotune`` when they are on, flagged
    when the timed iterations compiled graphs."""
    label = row["path"] + ("" if row["compile"] == "off" else f" +compile {row['compile']}")
    label += " +fused" if row.get("optimizer") == "fused" else ""
    label += " +ffn sort" if row.get("ffn_layout") == "sort" else ""
    label += " +gemm autotune" if row.get("gemm_autotune") else ""
    label += " +ln per token" if row.get("ln_affine") == "token" else ""
    label += f" +bag {row['embed']}" if row.get("embed", "eager") != "eager" else ""
    label += " +bf16 stream" if row.get("residual") == "compute" and row["precision"] != "fp32" else ""
    label += f" +{row['epochs']} epoch(s)" if row.get("epochs", 2) != 2 else ""
    n = row.get("compiled_when_timed", 0)  # its seconds include compile time: not the steady state
    return label + (f" (!{n} graphs compiled while timed)" if n else "")


def table(rows: list[dict]) -> str:
    head = (
        "| N | precision | path | requests (+reh.) | valid | rollout s | targets s | update s | eval s | "
        "req/s e2e | upd GFLOP/req | upd TFLOP/s | MFU | rollout TFLOP/s | peak GiB |"
    )
    lines = [head, "|" + "---:|" * 15]
    for r in rows:
        lines.append(
            f"| {r['sessions']:,} | {r['precision']} | {path_label(r)} | "
            f"{r['requests']:,} (+{r['rehearsed']:,}) | {r['valid']:,} | {r['rollout_s']:.3f} | "
            f"{r['targets_s']:.3f} | {r['update_s']:.3f} | {r['eval_s']:.1f} | {r['requests_per_s']:,.0f} | "
            f"{r['update_flops_per_request'] / 1e9:.2f} | {r['update_tflops']:.2f} | {r['update_mfu']:.1%} | "
            f"{r['rollout_tflops']:.2f} | {r['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def add_setting_args(p: argparse.ArgumentParser) -> None:
    """The flags of the benchmarked setting (``build``, ``model_for``, the rollout's K and ARR rate), shared with
    ``benchmarks/roofline_rl_iteration.py``, which counts the same iteration."""
    p.add_argument("--history", type=int, default=127, help="organic_history = ad_history: T = 2 + 2 x this")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--group-size", type=int, default=40, help="K sampled paths per request")
    p.add_argument("--arr-rate", type=float, default=0.5, help="ARR probability at the top activity tier")
    p.add_argument("--ads", type=int, default=20_000)
    p.add_argument("--organic", type=int, default=40_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--advertisers", type=int, default=1_000)
    p.add_argument("--levels", type=int, default=3, help="RQ-Kmeans levels (+ the disambiguation digit)")
    p.add_argument("--codebook", type=int, default=64, help="codes per RQ-Kmeans level")
    p.add_argument("--kmeans-iters", type=int, default=10)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def listed(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated flag's values, each one of ``allowed``; else a ``ValueError`` naming the flag and value."""
    values = [x for x in text.split(",") if x]
    for x in values:
        if x not in allowed:
            raise ValueError(f"{flag} {x!r} is invalid: expected one of {allowed}")
    return values


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sessions", default="4096", help="comma-separated N concurrent sessions, one row each")
    p.add_argument("--precision", default="fp32,bf16", help=f"comma-separated, of {PRECISIONS}")
    p.add_argument(
        "--old", action="store_true", help="also time the full-forward reference path (rows 'old')"
    )
    p.add_argument(
        "--compile",
        default="off",
        help=f"comma-separated PathTerms compile modes, one row each, of {COMPILE_MODES} (off = eager)",
    )
    p.add_argument(
        "--optimizer",
        default="foreach",
        help="comma-separated AdamW implementations, one row each: foreach (finiteness read on the host every "
        "minibatch) | fused (agents.hepo's on CUDA: non-finite steps skipped on the device, read once)",
    )
    add_setting_args(p)
    p.add_argument("--rollout-steps", type=int, default=2, help="env steps per iteration")
    p.add_argument("--epochs", default="2", help="comma-separated update epochs per iteration, one row each")
    p.add_argument("--minibatch", type=int, default=1024, help="requests per minibatch (x K paths)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (median)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="MFU denominator")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="rows of a torch.profiler table (by device time) of one extra iteration per row; 0 = none",
    )
    p.add_argument("--ffn-impl", default="auto", help="TypedFFN.impl: auto, grouped, chunked or loop")
    p.add_argument(
        "--ffn-layout",
        default="segments",
        help="comma-separated, one row each: segments (the library's update: the buffer's slot layout read once, "
        "the typed FFN as dense GEMMs per run of slots) | sort (the typed FFN sorts each minibatch's tokens by "
        "type, with --ffn-impl)",
    )
    p.add_argument(
        "--gemm-autotune",
        default="off",
        help="comma-separated, one row each: off (the library's: the compiled graphs' matmuls call the vendor "
        "library) | on (Inductor's max_autotune_gemm: each matmul's kernel raced among templates with the "
        "epilogue fused, at compile time; only with --compile other than off)",
    )
    p.add_argument(
        "--ln-affine",
        default="slot",
        help="comma-separated, one row each: slot (the library's: with the slot layout known, the typed "
        "LayerNorms' gains and biases per slot, broadcast over the rows) | token (gathered per token, (B, T, C))",
    )
    p.add_argument(
        "--embed",
        default="eager",
        help="comma-separated HSD.bag_embed values, one row each: eager (the library's: the small embedding tables "
        "concatenated in one embedding_bag in eager execution, a lookup per table where compiled) | always | never",
    )
    p.add_argument(
        "--residual",
        default="fp32",
        help=f"comma-separated ResidualStream.dtype values, one row each, of {RESIDUALS}: fp32 (the library's: the "
        "blocks' residual stream float32, only the matmuls' inputs rounded) | compute (under bf16 the stream in "
        "bf16 from the embeddings on); the same under fp32",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="benchmarks/results/bench_rl_iteration.json")
    args = p.parse_args(argv)
    precisions = listed(args.precision, "--precision", PRECISIONS)
    for name in (
        "group_size",
        "rollout_steps",
        "minibatch",
        "iters",
        "history",
        "d_model",
        "n_layers",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ffn_impl not in ("auto", "grouped", "chunked", "loop"):
        raise ValueError(f"--ffn-impl {args.ffn_impl!r} is invalid: expected auto, grouped, chunked or loop")
    modes = listed(args.compile, "--compile", COMPILE_MODES)
    optimizers = [x == "fused" for x in listed(args.optimizer, "--optimizer", ("foreach", "fused"))]
    layouts = listed(args.ffn_layout, "--ffn-layout", ("segments", "sort"))
    autotune = [x == "on" for x in listed(args.gemm_autotune, "--gemm-autotune", ("off", "on"))]
    affines = listed(args.ln_affine, "--ln-affine", ("slot", "token"))
    embeds = listed(args.embed, "--embed", ("eager", "always", "never"))
    residuals = listed(args.residual, "--residual", RESIDUALS)
    try:
        epochs = ints(args.epochs)
    except ValueError:
        epochs = []
    if not epochs or min(epochs) < 1:
        raise ValueError(f"--epochs={args.epochs} is invalid: expected comma-separated integers >= 1")
    if any(autotune) and modes == ["off"]:
        raise ValueError(
            "--gemm-autotune on needs --compile other than off (eager matmuls are not autotuned)"
        )
    TypedFFN.impl = args.ffn_impl  # the class default, as benchmarks/bench_decode.py sets it
    dev = torch.device(args.device)
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_rl_iteration.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "flop_formula": "update: 3 x forward matmul FLOPs per trained request (module doc of bench_rl_iteration)",
        "rows": [],
    }
    rows = res["rows"]
    for n in ints(args.sessions):
        for precision in precisions:
            # one row per combination of the listed settings (run_row's keywords); --old adds the reference path
            settings = dict(
                compile_mode=modes,
                fused=optimizers,
                ffn_layout=layouts,
                gemm_autotune=autotune,
                ln_affine=affines,
                embed=embeds,
                residual=residuals,
                epochs=epochs,
            )
            variants = [
                (True, dict(zip(settings, combo, strict=True)))
                for combo in itertools.product(*settings.values())
            ]
            variants = [
                (c, v) for c, v in variants if not (v["gemm_autotune"] and v["compile_mode"] == "off")
            ]
            for cached, setting in variants + ([(False, {})] if args.old else []):
                rows.append(run_row(args, n, precision, cached, **setting))
                gc.collect()  # the row's env, model and optimiser go before the next row's peak is measured
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                write_json(args.out, res)  # after every row: a run cut short keeps the rows it finished
    print(table(rows))
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    run_main(main)
