"""IncrementalDecoder: the KV-cached step == the full (non-cached) forward of the next request, step after
step; fused/compiled == eager; CUDA graphs == eager on a GPU; bad input raises."""

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

from gpr_sim.decoding import beam_search
from gpr_sim.model import GPRConfig, GPRModel, IncrementalDecoder
from gpr_sim.model.hsd import small_matmul
from gpr_sim.schema import TYPE_I, TokenBatch
from tests.test_model_gpr import random_trie
from tests.test_model_hsd import layout, make_tokens

CFG = GPRConfig(level_sizes=(6, 5, 4), d_model=32, n_layers=2, n_heads=2, max_len=20)
LAYOUT = layout(5, 5)  # T = 12: U, 5 O, 5 I, E


def step_inputs(b: int, new_tokens: int, gen: torch.Generator, cfg: GPRConfig = CFG) -> dict:
    """Random first-step inputs of ``prefill``: shown ad (codes, item), funnel events, E context, noise."""
    return {
        "codes": torch.stack([torch.randint(0, k, (b,), generator=gen) for k in cfg.level_sizes], 1),
        "items": torch.randint(0, 100, (b,), generator=gen),
        "events": torch.randint(1, 4, (b, new_tokens - 1), generator=gen),
        "context": torch.randn(b, cfg.dense_dim, generator=gen),
        "noise": torch.randn(b, cfg.d_model, generator=gen),
    }


def setup(b: int, new_tokens: int, mode: str = "eager", seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    model = GPRModel(CFG).to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    trie = random_trie(CFG, n=50, seed=seed)
    tokens = make_tokens(LAYOUT, b, gen, CFG)
    inputs = step_inputs(b, new_tokens, gen)
    trie, tokens = trie.to(device), tokens.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return model, trie, tokens, inputs, IncrementalDecoder(model, trie, mode, new_tokens)


def full_request(tokens: TokenBatch, new: TokenBatch) -> TokenBatch:
    """The next request without a cache: the prefix without its old E, then the appended tokens."""
    return TokenBatch(*(torch.cat([a[:, :-1], b], 1) for a, b in zip(tokens, new, strict=True)))


def test_step_parts_equal_the_full_forward_of_the_next_request():
    """The step's HSD + thinking on the cache == the full model on [prefix without old E | new I.. | E]."""
    model, trie, tokens, inputs, dec = setup(3, new_tokens=3)
    with torch.no_grad():
        st = dec.prefill(tokens, **inputs)
        new = dec.new_request_tokens(st)
        assert new.type_ids.tolist() == [[TYPE_I, TYPE_I, 2]] * 3  # I, I, E
        assert torch.equal(new.positions[:, 0], tokens.positions[:, -1])  # continues at the old E's
        th, new_kv = dec.hsd_think(st.layers, st.type_ids, st.padding_mask, st.think, new)
        full = full_request(tokens, new)
        hidden = model.hsd(full).hidden
        want = model.ptd.thinking(hidden, full.padding_mask)
        assert_close(th, want, atol=1e-5, rtol=1e-5)
        noise = torch.randn(3, CFG.d_model, generator=torch.Generator().manual_seed(1))
        ctx, kv = dec.context(th, noise)
        assert_close(ctx, model.ptd.context(hidden, full.padding_mask, noise=noise), atol=1e-5, rtol=1e-5)
        assert_close(kv[0][0], model.ptd.context_kv(model.head_context(ctx, 0))[0][0])
        st2 = dec.prefill(tokens, **inputs, sub=2)  # sub-batched prefill: the same state
        for a, b in zip(st.layers, st2.layers, strict=True):
            assert_close(a.k, b.k, atol=1e-5, rtol=1e-5)
        for a, b in zip(st.think, st2.think, strict=True):
            assert_close(a, b, atol=1e-5, rtol=1e-5)
        out = dec(st, 4, 3)  # a whole step runs and feeds the shown ad back
        # the same decision as the full path: model.beam_fns on the full re-encode, same refiner noise
        ctx_full = model.ptd.context(hidden, full.padding_mask, noise=st.noise)
        res = beam_search(model.beam_fns(ctx_full)[0], trie, batch_size=3, beam_width=4, top_k=3)
        assert torch.equal(st.codes, res.codes[:, 0].clamp_min(0)) and torch.equal(out.items, res.items)
        want_vals = model.values(ctx_full.repeat_interleave(3, 0), res.codes.clamp_min(0).flatten(0, 1))
        assert_close(out.values.flatten(0, 1), want_vals, atol=1e-5, rtol=1e-5)  # per path, context repeated
    assert out.values.shape == (3, 3, CFG.path_len + 1)
    assert len(new_kv) == CFG.n_layers
    for buf, kv in zip(st.tail, new_kv, strict=True):  # the step stored the new slots' K/V
        assert_close(buf.k, kv.k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_steps_equal_the_full_forward_step_after_step(new_tokens):
    """Three steps, each appending new tokens (the ad the previous step showed, new events and context
    written in place): the KV-cached step's top-K items, paths, log-probs and HTE values == beam search
    with the non-cached PTD on the full re-encode of the same tokens (fp32)."""
    b, beam, top_k = 4, 5, 3
    model, trie, tokens, inputs, dec = setup(b, new_tokens, seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        st = dec.prefill(tokens, **inputs)
        shown_codes, shown_items = inputs["codes"], inputs["items"]
        for step in range(3):
            if step:  # the env's next request: fresh funnel events and context, written in place
                st.events.copy_(torch.randint(1, 4, st.events.shape, generator=gen))
                st.context.copy_(torch.randn(st.context.shape, generator=gen))
            new = dec.new_request_tokens(st)  # (B, new_tokens): I tokens of the ad shown last, then E
            assert torch.equal(new.dense_features[:, -1], st.context)
            if new_tokens > 1:
                assert torch.equal(new.token_ids[:, 0], shown_items)
                assert torch.equal(new.semantic_codes[:, 0], shown_codes)
                assert torch.equal(new.event_ids[:, :-1], st.events)
            full = full_request(tokens, new)
            ctx = model.context(full, noise=st.noise)  # (B, Cc, C), no cache anywhere
            want = beam_search(model.beam_fns(ctx)[0], trie, batch_size=b, beam_width=beam, top_k=top_k)
            got = dec(st, beam, top_k)
            assert torch.equal(got.items, want.items) and torch.equal(got.codes, want.codes)
            assert_close(got.log_prob, want.log_prob, atol=1e-5, rtol=1e-5)
            paths = want.codes.clamp_min(0)  # (B, top_k, L')
            want_vals = model.values(ctx.repeat_interleave(top_k, 0), paths.flatten(0, 1)).view(b, top_k, -1)
            assert_close(got.values, want_vals, atol=1e-5, rtol=1e-5)
            assert torch.equal(st.codes, paths[:, 0]) and torch.equal(st.items, want.items[:, 0].clamp_min(0))
            shown_codes, shown_items = st.codes.clone(), st.items.clone()
            assert (want.items >= 0).all()  # 50 items, beam 5: every row fills its top-3


def test_rows_of_a_state_step_like_the_whole_state():
    """A step on ``rows(sl)`` == those rows of the whole state's step, and writes through to the state."""
    model, trie, tokens, inputs, dec = setup(5, new_tokens=2, seed=4)
    with torch.no_grad():
        st = dec.prefill(tokens, **inputs)
        whole = copy.deepcopy(st)
        want = dec(whole, 4, 3)
        got = dec(st.rows(slice(1, 4)), 4, 3)
    assert_close(got.values, want.values[1:4], atol=1e-5, rtol=1e-5)
    assert torch.equal(got.items, want.items[1:4])
    assert torch.equal(st.codes[1:4], whole.codes[1:4])  # views: the step wrote into the parent state
    assert torch.equal(st.codes[[0, 4]], inputs["codes"][[0, 4]])  # rows outside the slice untouched


@pytest.mark.parametrize("mode", [pytest.param("compiled", marks=pytest.mark.slow), "fused"])  # ~2 min each
def test_compiled_steps_equal_the_eager_step(mode):
    """The model parts compiled, or the whole step as one graph (tiny matmuls as reductions inside it),
    == the eager step, two steps in a row."""
    model, trie, tokens, inputs, eager = setup(5, new_tokens=3)
    fast = IncrementalDecoder(model, trie, mode, new_tokens=3)
    with torch.no_grad():
        st = eager.prefill(tokens, **inputs)
        st2 = copy.deepcopy(st)
        for _ in range(2):  # the second step reads the shown ad the first one wrote
            want, got = eager(st, 4, 3), fast(st2, 4, 3)
            assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
            assert_close(got.log_prob, want.log_prob, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.items, want.items) and got.items.shape == (5, 3)
            assert torch.equal(st.codes, st2.codes) and torch.equal(st.items, st2.items)
            for a, b in zip(st.tail, st2.tail, strict=True):
                assert_close(b.k, a.k, atol=1e-5, rtol=1e-5)


def test_graphs_mode_on_cpu_fails_with_a_clear_error():
    model, trie, tokens, inputs, _ = setup(2, new_tokens=2)
    dec = IncrementalDecoder(model, trie, "graphs", new_tokens=2)
    with torch.no_grad():
        st = dec.prefill(tokens, **inputs)
        with pytest.raises(ValueError, match="CUDA"):
            dec(st, 4, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "graphs"])
def test_fused_and_graphs_equal_eager_on_cuda(mode):
    """On a GPU: the fused step and its CUDA-graph replay == the eager step, three steps in a row."""
    model, trie, tokens, inputs, eager = setup(5, new_tokens=2, device="cuda")
    fast = IncrementalDecoder(model, trie, mode, new_tokens=2)
    with torch.no_grad():
        st = eager.prefill(tokens, **inputs)
        st2 = copy.deepcopy(st)
        for _ in range(3):
            want, got = eager(st, 4, 3), fast(st2, 4, 3)
            assert_close(got.values, want.values, atol=1e-4, rtol=1e-4)
            assert torch.equal(got.items, want.items)
            assert torch.equal(st.codes, st2.codes) and torch.equal(st.items, st2.items)
    fast.release()


def test_bad_input_raises():
    model, trie, tokens, inputs, dec = setup(2, new_tokens=2)
    with pytest.raises(ValueError, match="mode"):
        IncrementalDecoder(model, trie, "turbo", new_tokens=2)
    with pytest.raises(ValueError, match="new_tokens"):
        IncrementalDecoder(model, trie, "eager", new_tokens=0)
    with pytest.raises(ValueError, match="HTE"):
        IncrementalDecoder(GPRModel(dataclasses.replace(CFG, hte=False)), trie, "eager", new_tokens=2)
    with pytest.raises(ValueError, match="events"):
        dec.prefill(tokens, **{**inputs, "events": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="max_len"):
        IncrementalDecoder(model, trie, "eager", new_tokens=10).prefill(
            tokens, **{**inputs, "events": torch.ones(2, 9, dtype=torch.long)}
        )  # T = 12: the last appended position 11 + 9 = 20 needs max_len > 20
    no_e = TokenBatch(*(x[:, :-1] for x in tokens))  # ends with an I slot
    with pytest.raises(ValueError, match="last slot"):
        dec.prefill(no_e, **inputs)


def test_small_matmul_under_compile_equals_matmul():
    g = torch.Generator().manual_seed(0)
    cases = [((3, 2, 2, 16), (3, 2, 16, 2)), ((3, 2, 4, 2), (3, 2, 2, 16)), ((3, 2, 8, 16), (3, 2, 16, 5))]
    fn = torch.compile(small_matmul, dynamic=False)
    for sa, sb in cases:
        a, b = torch.randn(*sa, generator=g), torch.randn(*sb, generator=g)
        assert_close(fn(a, b), a @ b, atol=1e-5, rtol=1e-5)
        assert_close(small_matmul(a, b), a @ b)  # eager: matmul itself
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = a @ b
            got = fn(a, b)
        assert got.dtype == want.dtype == torch.bfloat16
        assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
