"""The rollout and the update on the cached PTD equal the full-forward reference; bf16 autocast of the
update stays close to fp32; the RL iteration benchmark runs on CPU at tiny sizes.

Reference beside fast: ``sample_groups(cached=False)`` / ``path_terms(cached=False)`` run the PTD over the
context and the prefix for every path (and level), the defaults decode the context once per request.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import types
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import envs  # noqa: F401  (registers ads-v0)
from agents.rl.common import LossConfig
from agents.rl.hepo import HEPO
from agents.rl.loop import PathTerms, UpdateConfig, loss_terms, path_terms
from agents.rl.rollout import Roller, sample_groups
from envs import make_vec_env
from gpr_sim.model import GPRConfig, GPRModel
from gpr_sim.model.hsd import type_segments
from gpr_sim.model.incremental import head_context_kv, path_log_prob, request_major_step
from gpr_sim.model.precision import (
    RESIDUALS,
    ResidualStream,
    precision_context,
    residual_stream,
    to_stream,
)
from gpr_sim.schema import SchemaConfig, tokens_from_obs
from gpr_sim.tokenizer.compare import CompareConfig
from gpr_sim.tokenizer.world import fit_world_tokenizer
from gpr_sim.world import preset, rng
from tests.test_model_gpr import random_trie
from tests.test_model_hsd import layout, make_tokens

CFG = GPRConfig(level_sizes=(6, 5, 4), d_model=32, n_layers=2, n_heads=2, max_len=20)
LAYOUT = layout(5, 5)  # T = 12: U, 5 O, 5 I, E


def _model_inputs(b: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPRModel(CFG).eval()
    gen = torch.Generator().manual_seed(seed)
    trie = random_trie(CFG, n=50, seed=seed)
    tokens = make_tokens(LAYOUT, b, gen, CFG)
    u = rng.uniforms(torch.arange(b) * 7919 + seed, CFG.d_model + k * CFG.path_len)
    return model, trie, tokens, u


def test_cached_sampling_equals_the_full_forward_reference():
    """Same keyed numbers -> the same paths; per-level log-probs and HTE values equal up to fp32 rounding,
    and equal the teacher-forced full forward (``model.log_prob``, what the update recomputes)."""
    b, k = 7, 9
    model, trie, tokens, u = _model_inputs(b, k)
    eligible = torch.rand(50, generator=torch.Generator().manual_seed(1)) < 0.6
    fast = sample_groups(model, trie, tokens, eligible, k, u, cached=True, chunk=3)  # 3 HSD chunks
    ref = sample_groups(model, trie, tokens, eligible, k, u, cached=False)
    noise_f, s_f, v_f = fast
    noise_r, s_r, v_r = ref
    assert torch.equal(noise_f, noise_r)
    # the draws are inverse-CDF reads of the same keyed numbers: identical unless rounding moves a CDF
    # boundary across a draw (probability ~1e-7 per draw at these sizes)
    assert torch.equal(s_f.codes, s_r.codes) and torch.equal(s_f.items, s_r.items)
    assert bool(s_f.valid.all())
    for a, c in zip(s_f.legal, s_r.legal, strict=True):
        assert torch.equal(a, c)
    assert_close(s_f.log_prob, s_r.log_prob, atol=1e-5, rtol=1e-5)
    assert_close(v_f, v_r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ctx = model.context(tokens, noise=noise_f)
        full = model.log_prob(
            ctx.repeat_interleave(k, 0), s_f.codes.flatten(0, 1), [m.flatten(0, 1) for m in s_f.legal]
        ).view(b, k, -1)
        v_full = torch.stack([model.values(ctx, s_f.codes[:, j]) for j in range(k)], 1)
    assert_close(s_f.log_prob, full, atol=1e-5, rtol=1e-5)
    assert_close(v_f, v_full, atol=1e-5, rtol=1e-5)


def test_request_major_step_equals_the_gathered_level_logits():
    """The shared step (context K/V read per request) == ``level_logits`` on the gathered context."""
    b, w = 4, 3
    model, _, tokens, _ = _model_inputs(b, 1)
    with torch.no_grad():
        ctx = model.context(tokens, noise=torch.zeros(b, CFG.d_model))
        step = request_major_step(model.ptd.level_logits_cached, head_context_kv(model, ctx), b)
        row = torch.arange(b).repeat_interleave(w)
        prefix = torch.randint(0, 5, (b * w, 2), generator=torch.Generator().manual_seed(2))
        assert_close(step(row, prefix), model.level_logits(ctx[row], prefix), atol=1e-5, rtol=1e-5)
        assert_close(step(torch.arange(b), prefix[:b, :0]), model.level_logits(ctx, prefix[:b, :0]))


def test_cached_teacher_forced_log_prob_equals_the_reference_forward_and_backward():
    b, k = 5, 4
    model, trie, tokens, u = _model_inputs(b, k, seed=3)
    _, s, _ = sample_groups(model, trie, tokens, None, k, u)
    model.train()
    w = torch.randn(b, k, CFG.path_len, generator=torch.Generator().manual_seed(4))

    def run(cached: bool):
        model.zero_grad(set_to_none=True)
        ctx = model.context(tokens, noise=torch.zeros(b, CFG.d_model))
        if cached:
            lp = path_log_prob(model, ctx, s.codes, s.legal)
        else:
            masks = [m.flatten(0, 1) for m in s.legal]
            lp = model.log_prob(ctx.repeat_interleave(k, 0), s.codes.flatten(0, 1), masks).view(b, k, -1)
        (lp * w).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lp_f, g_f = run(True)
    lp_r, g_r = run(False)
    assert_close(lp_f, lp_r, atol=1e-5, rtol=1e-5)
    assert g_f.keys() == g_r.keys() and len(g_f) > 0
    for name in g_f:
        assert_close(g_f[name], g_r[name], atol=1e-5, rtol=1e-4, msg=name)


# -- the Roller and the update on a real (small) market ---------------------------------------------
def _market(n: int = 12):
    world = preset("small", num_ads=120, num_organic=300, num_users=400, num_advertisers=10)
    env = make_vec_env("ads-v0", n, config=world, device="cpu", validate_actions=False)
    tok = fit_world_tokenizer(
        env.unwrapped.world, "rq-kmeans", CompareConfig(num_levels=2, codebook_size=6, kmeans_iters=3)
    )
    schema = SchemaConfig.from_world(world)
    obs, _ = env.reset(seed=0)
    dense = tokens_from_obs(obs, tok.table, schema, check=False).dense_features.shape[-1]
    cfg = GPRConfig(
        level_sizes=tuple(tok.level_sizes), d_model=16, n_layers=1, n_heads=2, dense_dim=dense,
        max_len=schema.seq_len,
    )  # fmt: skip
    return env, tok, cfg


@pytest.fixture(scope="module")
def rollouts():
    """The same two-step rollout through the cached path and the reference (same seed, same market)."""
    out = {}
    for cached in (True, False):
        env, tok, cfg = _market()
        torch.manual_seed(0)
        model = GPRModel(cfg).eval()
        roller = Roller(env, tok, group_size=5, estimator="truth", arr_rate=1.0, seed=3, cached=cached)
        buf, stats = roller.collect(model, 2)
        out[cached] = (model, buf, stats)
        out["trie"] = tok.trie
    return out


def test_roller_cached_equals_the_reference_rollout(rollouts):
    _, fast, s_fast = rollouts[True]
    _, ref, s_ref = rollouts[False]
    assert s_fast["rollout/rehearsed"] > 0  # ARR requests took the same path
    assert torch.equal(fast.codes, ref.codes)  # same draws -> same paths, same served ads, same market
    assert torch.equal(fast.uid, ref.uid)
    assert_close(fast.old_log_prob, ref.old_log_prob, atol=1e-5, rtol=1e-5)
    assert_close(fast.old_values, ref.old_values, atol=1e-5, rtol=1e-5)
    assert_close(fast.reward, ref.reward)


def test_update_terms_cached_equal_the_reference(rollouts):
    model, buf, _ = rollouts[True]
    lp_f, v_f = path_terms(model, buf, cached=True)
    lp_r, v_r = path_terms(model, buf, cached=False)
    assert_close(lp_f, lp_r, atol=1e-5, rtol=1e-5)
    assert_close(v_f, v_r)
    # before any step the update recomputes the rollout's log-probs (PPO ratio 1)
    assert_close(lp_f, buf.old_log_prob, atol=1e-5, rtol=1e-5)
    # the update reads the buffer's slot layout once and runs the typed FFN per run of slots: same terms
    segments = type_segments(buf.tokens.type_ids)
    assert segments is not None and segments[-1][1] == buf.tokens.type_ids.shape[1]
    lp_s, v_s = path_terms(model, buf, cached=True, segments=segments)
    assert_close(lp_s, lp_f, atol=1e-5, rtol=1e-5)
    assert_close(v_s, v_f, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile on CPU: about a minute
@pytest.mark.parametrize("mode", ["full", "blocks", "regions"])
def test_compiled_update_terms_equal_eager(rollouts, monkeypatch, mode):
    from gpr_sim.model.hsd import TypedFFN

    # the CUDA implementation without data-dependent shapes (CPU's default "loop" indexes by type)
    monkeypatch.setattr(TypedFFN, "impl", "chunked")
    model, buf, _ = rollouts[True]
    model.train()
    twin = copy.deepcopy(model)  # "blocks" compiles in place: the shared fixture's model stays eager
    eager, compiled = PathTerms(model), PathTerms(twin, compile=mode)
    # the compiled forward as the update calls it: with the buffer's slot layout (the typed FFN by segments)
    segments = {eager: None, compiled: type_segments(buf.tokens.type_ids)}
    for a, c in zip(compiled(buf, segments[compiled]), eager(buf), strict=True):
        assert_close(a, c, atol=1e-5, rtol=1e-5)
    # the gradients too: the update backpropagates through the compiled graph
    grads = []
    for m, fn in ((model, eager), (twin, compiled)):
        m.zero_grad()
        lp, v = fn(buf, segments[fn])
        (lp.sum() + v.sum()).backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
        m.zero_grad()
    for a, c in zip(*grads, strict=True):
        assert_close(c, a, atol=1e-4, rtol=1e-4)


def test_path_terms_rejects_an_unknown_compile_mode(rollouts):
    with pytest.raises(ValueError, match="compile='fast' is invalid"):
        PathTerms(rollouts[True][0], compile="fast")


def test_bf16_update_losses_stay_close_to_fp32(rollouts):
    """bf16 autocast rounds every matmul input to 8 significant bits (relative 2^-9 ~ 0.2%); through one
    HSD block, thinking, refiner and PTD the per-level log-probs move by a few 1e-3, so the policy loss (a
    mean of ratio x advantage terms, advantages of order 1) and the critic losses (squared errors of values of
    order 1) move by ~1e-2 at most: tolerance 0.03 absolute + 3% relative. fp32 is the reference."""
    model, buf, _ = rollouts[True]
    model.train()
    buf.adv, buf.returns = HEPO.targets(buf, LossConfig())
    terms = PathTerms(model)
    with torch.no_grad():
        fp32 = loss_terms(HEPO, LossConfig(), terms, None, buf)
        with precision_context("cpu", "bf16"):
            bf16 = loss_terms(HEPO, LossConfig(), terms, None, buf)
    for key in ("loss", "policy", "critic", "item_value"):
        assert fp32[key].dtype == torch.float32 and bf16[key].dtype == torch.float32, key
        assert_close(bf16[key], fp32[key], atol=0.03, rtol=0.03, msg=key)
    assert not torch.equal(bf16["loss"], fp32["loss"])  # autocast did run in bf16


@pytest.mark.parametrize("stream", RESIDUALS)
def test_bf16_residual_stream_log_probs_stay_close_to_fp32(stream, monkeypatch):
    """The residual stream in bf16 (``ResidualStream.dtype`` = compute) or in fp32 (the default) under autocast:
    the blocks see the stream in that dtype, and the per-level log-probs of the same paths stay near the fp32
    reference. Tolerance: every bf16 rounding is relative 2^-9; through 2 HSD blocks, thinking, refiner and 2
    PTD blocks a logit of order 1 moves by a few 1e-2 at most, so a log-prob (a difference of such terms) stays
    within 0.1 absolute. Under bf16 the rollout's cached decode gives its paths the log-probs the update's full
    forward gives them, within the same tolerance."""
    monkeypatch.setattr(ResidualStream, "dtype", stream)
    b, k = 5, 4
    model, trie, tokens, u = _model_inputs(b, k)
    seen: list[torch.dtype] = []
    hook = model.hsd.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    noise, s32, _ = sample_groups(model, trie, tokens, None, k, u)
    with precision_context("cpu", "bf16"):
        noise16, s16, _ = sample_groups(model, trie, tokens, None, k, u)
    hook.remove()
    assert seen[0] == torch.float32  # fp32: no autocast, no cast
    assert set(seen[1:]) == {torch.bfloat16 if stream == "compute" else torch.float32}

    def full(s, noise_):  # the update's teacher-forced full forward of the sampled paths
        ctx = model.context(tokens, noise=noise_).repeat_interleave(k, 0)
        return model.log_prob(ctx, s.codes.flatten(0, 1), [m.flatten(0, 1) for m in s.legal]).view(b, k, -1)

    with torch.no_grad():
        ref = full(s32, noise)
        with precision_context("cpu", "bf16"):
            on_fp32_paths, on_own_paths = full(s32, noise).float(), full(s16, noise16).float()
    assert_close(on_fp32_paths, ref, atol=0.1, rtol=0)
    assert not torch.equal(on_fp32_paths, ref)  # autocast did run in bf16
    assert_close(s16.log_prob, on_own_paths, atol=0.1, rtol=0)  # cached decode vs full forward, both bf16


def test_residual_stream_rejects_an_unknown_dtype(monkeypatch):
    monkeypatch.setattr(ResidualStream, "dtype", "fp16")
    with pytest.raises(ValueError, match="ResidualStream.dtype='fp16' is invalid"):
        to_stream(torch.zeros(2))


def test_a_runs_residual_stream_is_restored_after_it():
    """``residual_stream`` (what an RL run wraps itself in): the stream inside, the previous one after, also when
    the run raises; an unknown dtype is refused before anything is set."""
    before = ResidualStream.dtype
    x = torch.zeros(2)
    with precision_context("cpu", "bf16"):
        with pytest.raises(RuntimeError, match="stopped"), residual_stream("compute"):
            assert to_stream(x).dtype == torch.bfloat16
            raise RuntimeError("stopped")
        assert ResidualStream.dtype == before and to_stream(x).dtype == torch.float32
    with pytest.raises(ValueError, match="residual_stream='half' is invalid"), residual_stream("half"):
        pass
    assert ResidualStream.dtype == before


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision='fp16'"):
        UpdateConfig(precision="fp16")
    env, tok, _ = _market(2)
    with pytest.raises(ValueError, match="precision='half'"):
        Roller(env, tok, group_size=2, estimator="truth", arr_rate=0.0, seed=0, precision="half")
    model, trie, tokens, u = _model_inputs(2, 2)
    with pytest.raises(ValueError, match="chunk=0"):
        sample_groups(model, trie, tokens, None, 2, u, chunk=0)


# -- the benchmark ------------------------------------------------------------------------------------
_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rl_iteration.py"
_spec = importlib.util.spec_from_file_location("bench_rl_iteration", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = (
    "--device cpu --sessions 4 --history 3 --d-model 16 --n-layers 1 --n-heads 2 --group-size 4 --ads 60 "
    "--organic 80 --users 100 --advertisers 6 --minibatch 4 --warmup 0 --iters 1 --codebook 4 --levels 2 "
    "--kmeans-iters 2 --precision fp32,bf16 --old"
).split()


def test_bench_rl_iteration_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["precision"], r["path"]) for r in rows] == [
        ("fp32", "cached"),
        ("fp32", "old"),
        ("bf16", "cached"),
        ("bf16", "old"),
    ]
    for r in rows:
        assert r["seq_len"] == 8 and r["requests"] == 4 * 2  # T = 2 + 2 x 3; N x rollout steps
        for key in ("rollout_s", "update_s", "requests_per_s", "update_flops_per_request", "update_tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["update_mfu"] == pytest.approx(r["update_tflops"] / bench.H200_BF16_DENSE_TFLOPS)
        assert r["compiled_when_timed"] == 0 and "compiled while timed" not in bench.path_label(r)  # eager
    # the old path repeats the context for every path: more update FLOPs per request
    assert rows[1]["update_flops_per_request"] > rows[0]["update_flops_per_request"]


def test_bench_rl_iteration_profile_splits_the_rollout_by_part(tmp_path):
    """With --profile the row says where the rollout's host time went, by the Roller's own labels: every part
    that ran is there, each a positive number of seconds (no CUDA here, so no device_s)."""
    out = tmp_path / "bench.json"
    argv = [a for a in TINY if a not in ("--old",)]
    argv[argv.index("fp32,bf16")] = "fp32"
    bench.main([*argv, "--profile", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    split = row["rollout_split"]
    parts = ["tokens", "sample", "score", "monitor", "env_step"] + (["rehearse"] if row["rehearsed"] else [])
    assert sorted(split) == sorted(f"rollout/{p}/host_s" for p in parts)
    assert all(math.isfinite(v) and v > 0 for v in split.values())


def test_kernel_classes_and_seconds_per_phase():
    """CUDA kernel names map to the roofline's classes (first match: a Triton GEMM template is a GEMM, not a fused
    element-wise kernel), and each kernel's device time lands in the phase whose host window holds its start."""
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
        "triton_tem_fused_addmm_gelu_0": "gemm (triton template)",
        "triton_poi_fused_add_mul_native_layer_norm_3": "fused (triton)",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "element-wise (aten)",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<float>": "gather / scatter",
        "Memcpy DtoD (Device -> Device)": "copy / fill",
        "void at::native::fused_adam_kernel": "optimiser",
        "some_new_kernel": "other",
    }
    assert {n: bench.kernel_class(n) for n in names} == names
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device, start, end, annotation=False):
        span = types.SimpleNamespace(start=start, end=end)
        return types.SimpleNamespace(
            name=name, device_type=device, time_range=span, is_user_annotation=annotation
        )

    events = [
        event("rollout", cpu, 0, 100),
        event("update", cpu, 100, 400),
        event("update", cuda, 100, 400, annotation=True),  # the label's device copy: not a kernel
        event("triton_poi_fused_add_0", cuda, 10, 30),
        event("sm90_xmma_gemm_bf16", cuda, 150, 250),
        event("sm90_xmma_gemm_bf16", cuda, 250, 300),
        event("triton_poi_fused_mul_1", cuda, 390, 420),  # starts in the update: counted there
    ]
    prof = types.SimpleNamespace(events=lambda: events)
    seconds = bench.kernel_seconds(prof)
    assert seconds == {
        "rollout": pytest.approx({"fused (triton)": 20e-6}),
        "update": pytest.approx({"gemm": 150e-6, "fused (triton)": 30e-6}),
    }
    assert list(seconds["update"]) == ["gemm", "fused (triton)"]  # largest first


def test_bench_rl_iteration_gemm_autotune_flag_is_checked_before_any_row(tmp_path):
    """--gemm-autotune is a row dimension of compiled rows only: a bad value, or "on" with every row eager
    (nothing would be autotuned), is one clear error before any world or model is built."""
    out = tmp_path / "bench.json"
    with pytest.raises(ValueError, match="--gemm-autotune 'yes' is invalid"):
        bench.main([*TINY, "--gemm-autotune", "yes", "--out", str(out)])
    with pytest.raises(ValueError, match="--gemm-autotune on needs --compile"):
        bench.main([*TINY, "--gemm-autotune", "on", "--out", str(out)])
    for flag in (
        "--ln-affine",
        "--embed",
        "--ffn-layout",
        "--optimizer",
    ):  # every row dimension, the same way
        with pytest.raises(ValueError, match=f"{flag} 'sometimes' is invalid"):
            bench.main([*TINY, flag, "sometimes", "--out", str(out)])
    assert not out.exists()


def test_compiled_graphs_counts_what_torch_compile_builds():
    """The benchmark's check that a timed iteration did not compile: a new graph (a first call, a recompile for
    a new shape) raises the count, a call that reuses a graph does not; a row that compiled is flagged."""
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    before = bench.compiled_graphs()
    fn(torch.ones(3))
    first = bench.compiled_graphs()
    fn(torch.zeros(3))
    assert first == before + 1 and bench.compiled_graphs() == first
    fn(torch.ones(5))  # static shapes: a new size is a new graph
    assert bench.compiled_graphs() == first + 1
    row = {"path": "cached", "compile": "regions", "compiled_when_timed": 2}
    assert bench.path_label(row) == "cached +compile regions (!2 graphs compiled while timed)"


def test_busy_seconds_is_the_union_of_intervals_inside_the_window():
    """Overlapping kernels count once, gaps not at all, and the parts outside the phase's window are cut."""
    kernels = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.8), (9.0, 12.0), (-3.0, -1.0)]
    assert bench.busy_seconds(kernels, (0.0, 10.0)) == pytest.approx(3.0 + 1.0 + 1.0)
    assert bench.busy_seconds(kernels, (2.5, 5.5)) == pytest.approx(0.5 + 0.5)
    assert bench.busy_seconds([], (0.0, 1.0)) == 0.0


def test_flop_formula_on_a_hand_worked_config():
    """d=4, f=1, F=2 dense features, T=3, 1 HSD layer, 1 thinking token, no refiner, 1 decoder layer, K=2,
    L'=1 of 3 codes.

    Update forward. HSD: dense 3 x 2 x 2 x 4 = 48, 3 x 2 x (5 x 16 + 2 x 16) = 672, attention 4 x 9 x 4 = 144;
    thinking: 3 x 2 x 2 x 16 = 192, 4 x 1 x 3 x 4 = 48, 1 x 2 x (2 x 16 + 2 x 16) = 128; PTD: Cc = 1 context
    token: 1 x 2 x (16 + (64 + 32)) = 224, cached paths K L' = 2 tokens: 2 x 2 x 96 = 384, heads
    2 x 2 x 4 x 3 = 48; HTE: (1 + 2) x 2 x (32 + 4) + 2 x 16 = 248. Forward 2136; update = 3 x 2136 = 6408.
    Old: K (Cc + L') - Cc = 3 tokens through the decoder instead of 2: forward 2136 + 2 x 96 = 2328, update
    6984.

    Rollout: trunk, context and HTE as above without the paths and heads: 2136 - 384 - 48 = 1704; one level,
    scored once per request: the BOS token's projections 2 x 3 x 16 = 96 + its out and MLP 2 x (16 + 32) = 96,
    head 2 x 4 x 3 = 24 -> 1920. Old: no context pass (1704 - 2 x 96 = 1512), context + BOS through the block
    in full 2 x 192 = 384, head 24 -> 1920 (with one level the two paths do the same work).
    """
    cfg = GPRConfig(
        level_sizes=(3,), d_model=4, n_layers=1, n_heads=1, ffn_mult=1, num_thinking=1, refining=False,
        max_len=3, dense_dim=2,
    )  # fmt: skip
    assert bench.forward_flops(cfg, 3, 2, 2) == 2136
    assert bench.update_flops_per_request(cfg, 3, 2, cached=True) == 6408
    assert bench.update_flops_per_request(cfg, 3, 2, cached=False) == 6984
    assert bench.rollout_flops_per_request(cfg, 3, 2, cached=True) == 1920
    assert bench.rollout_flops_per_request(cfg, 3, 2, cached=False) == 1920


def test_flop_formula_matches_torch_flop_counter(rollouts):
    """The benchmark's matmul count vs ``torch.utils.flop_counter`` on the real forward passes.

    On CPU the counter does not count ``scaled_dot_product_attention`` (no formula for the CPU kernel), so
    the formula's SDPA terms (HSD n_layers x 4 T^2 d, thinking 4 Kt T d) are taken out; what remains differs
    by the PTD's own small attention products (split_attention), which the formula leaves out: < 5%."""
    from torch.utils.flop_counter import FlopCounterMode

    model, buf, _ = rollouts[True]
    cfg, n = model.cfg, len(buf)
    t, k = buf.tokens.type_ids.shape[1], buf.codes.shape[1]
    sdpa = cfg.n_layers * 4 * t * t * cfg.d_model + 4 * cfg.num_thinking * t * cfg.d_model
    with torch.no_grad():
        for cached in (True, False):
            with FlopCounterMode(display=False) as fc:
                path_terms(model, buf, cached)
            formula = bench.update_flops_per_request(cfg, t, k, cached) / 3 - sdpa
            assert fc.get_total_flops() / n == pytest.approx(formula, rel=0.05), cached
            u = rng.uniforms(buf.uid, cfg.d_model + k * cfg.path_len)
            with FlopCounterMode(display=False) as fc:
                sample_groups(model, rollouts["trie"], buf.tokens, None, k, u, cached=cached)
            formula = bench.rollout_flops_per_request(cfg, t, k, cached) - sdpa
            assert fc.get_total_flops() / n == pytest.approx(formula, rel=0.05), cached


def test_typed_layer_norm_equals_per_type_indexing_forward_and_backward():
    """``TypedLayerNorm`` gathers its per-type gain and bias with ``F.embedding`` (a faster CUDA backward):
    the same as ``weight[type_ids]``, values exactly and gradients up to summation order."""
    from gpr_sim.model.hsd import TypedLayerNorm

    gen = torch.Generator().manual_seed(5)
    ln = TypedLayerNorm(8, 4)
    with torch.no_grad():
        ln.weight.normal_(generator=gen)
        ln.bias.normal_(generator=gen)
    x = torch.randn(3, 7, 8, generator=gen)
    types = torch.randint(0, 4, (3, 7), generator=gen)
    g = torch.randn(3, 7, 8, generator=gen)
    out = ln(x, types)
    (out * g).sum().backward()
    ref = torch.nn.functional.layer_norm(x, (8,)) * ln.weight[types] + ln.bias[types]
    w_ref, b_ref = torch.autograd.grad((ref * g).sum(), [ln.weight, ln.bias])
    assert torch.equal(out, ref)
    assert_close(ln.weight.grad, w_ref)
    assert_close(ln.bias.grad, b_ref)
