"""HSD: hybrid mask vs a brute-force double loop, KV-cached incremental == full forward, switches."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gpr_sim.model import GPRConfig, GPRModel, hybrid_mask
from gpr_sim.model.hsd import HSD
from gpr_sim.schema import TYPE_E, TYPE_I, TYPE_O, TYPE_U, TokenBatch

TINY = GPRConfig(
    level_sizes=(5, 4, 3),
    d_model=32,
    n_layers=2,
    n_heads=2,
    ffn_mult=2,
    max_len=64,
    num_thinking=2,
    refine_steps=3,
    mtp_heads=2,
)


def make_tokens(types: list[int], b: int, gen: torch.Generator, cfg: GPRConfig = TINY) -> TokenBatch:
    """Random TokenBatch with the given slot types; O/I slots are padding with probability 1/3."""
    t = len(types)
    type_ids = torch.tensor(types).expand(b, t)
    item = (type_ids == TYPE_O) | (type_ids == TYPE_I)  # (B, T)
    pad = item & (torch.rand(b, t, generator=gen) < 1 / 3)
    real_item = item & ~pad
    codes = torch.stack([torch.randint(0, k, (b, t), generator=gen) for k in cfg.level_sizes], -1)
    codes = codes.masked_fill(~real_item[..., None], -1)  # (B, T, L')
    token_ids = torch.where(real_item, torch.randint(0, 100, (b, t), generator=gen), -1)
    token_ids = torch.where(type_ids == TYPE_U, 7, token_ids)
    events = torch.where(real_item & (type_ids == TYPE_I), torch.randint(1, 4, (b, t), generator=gen), 0)
    dense = torch.randn(b, t, cfg.dense_dim, generator=gen)
    dense = dense * ((type_ids == TYPE_U) | (type_ids == TYPE_E))[..., None]
    valid = ~pad
    positions = (torch.cumsum(valid.long(), 1) - 1) * valid
    return TokenBatch(token_ids, type_ids.clone(), positions, pad, codes, events, dense)


def layout(ho: int, hi: int) -> list[int]:
    return [TYPE_U] + [TYPE_O] * ho + [TYPE_I] * hi + [TYPE_E]


def slots(tokens: TokenBatch, a: int, b: int | None = None) -> TokenBatch:
    return TokenBatch(*(x[:, a:b] for x in tokens))


def brute_mask(types: list[int], pad: list[bool], hybrid: bool) -> torch.Tensor:
    t = len(types)
    m = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for k in range(t):
            if pad[k]:
                continue
            if not hybrid:
                m[q, k] = k <= q
            elif types[q] == TYPE_E:  # the request sees every slot up to itself
                m[q, k] = k <= q
            elif types[k] in (TYPE_U, TYPE_O):  # static prompt: seen by every query
                m[q, k] = True
            elif types[q] == TYPE_I and types[k] == TYPE_I:  # ad history: causal
                m[q, k] = k <= q
    return m


@pytest.mark.parametrize("hybrid", [True, False])
def test_hybrid_mask_matches_brute_force(hybrid):
    gen = torch.Generator().manual_seed(0)
    types = layout(3, 4) + [TYPE_I, TYPE_I, TYPE_E]  # also tokens appended after E (decoding)
    tokens = make_tokens(types, 6, gen)
    got = hybrid_mask(tokens.type_ids, tokens.padding_mask, hybrid=hybrid)
    assert got.shape == (6, len(types), len(types))
    for row in range(6):
        want = brute_mask(types, tokens.padding_mask[row].tolist(), hybrid)
        assert torch.equal(got[row], want), row


def test_hybrid_mask_hand_worked():
    # [U, O, I, I, E], the first I padded: U/O see U/O; I@3 sees U, O, itself; E sees all real slots
    types = torch.tensor([[TYPE_U, TYPE_O, TYPE_I, TYPE_I, TYPE_E]])
    pad = torch.tensor([[False, False, True, False, False]])
    want = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],  # a padded query still reads U/O, so its softmax row is never empty
            [1, 1, 0, 1, 0],
            [1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(hybrid_mask(types, pad)[0], want)


@pytest.mark.parametrize("mor", [False, True])
def test_kv_cache_incremental_equals_full(mor):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, mixture_of_recursions=mor)
    hsd = HSD(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    types = layout(3, 4) + [TYPE_I, TYPE_I]  # two ads appended after the request
    tokens = make_tokens(types, 3, gen, cfg)
    with torch.no_grad():
        full = hsd(tokens).hidden  # (B, T, C)
        # prefix [U O I] once, then append [I E], then append the two new I tokens one at a time
        out = hsd(slots(tokens, 0, 6))
        assert_close(out.hidden, full[:, :6])
        cut = len(layout(3, 4))
        out2 = hsd(slots(tokens, 6, cut), cache=out.cache)
        assert_close(out2.hidden, full[:, 6:cut], atol=1e-5, rtol=1e-5)
        cache = out2.cache
        for s in range(cut, len(types)):
            step = hsd(slots(tokens, s, s + 1), cache=cache)
            assert_close(step.hidden, full[:, s : s + 1], atol=1e-5, rtol=1e-5)
            cache = step.cache
    assert cache.length == len(types)
    assert len(cache.layers) == (cfg.n_layers - 1 + cfg.max_recursions if mor else cfg.n_layers)


def _changed_slots(cfg: GPRConfig, slot: int) -> torch.Tensor:
    """Slots whose output moves when the input embedding of ``slot`` is perturbed (no padding)."""
    torch.manual_seed(0)
    hsd = HSD(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    tokens = make_tokens(layout(2, 3), 1, gen, cfg)
    tokens = tokens._replace(padding_mask=torch.zeros_like(tokens.padding_mask))
    other = tokens.dense_features.clone()
    other[:, slot] += 1.0  # the dense projection reads every slot, so this moves slot's embedding
    with torch.no_grad():
        a = hsd(tokens).hidden
        b = hsd(tokens._replace(dense_features=other)).hidden
    return ((a - b).abs().amax(-1) > 1e-6)[0]


def test_information_flow_hybrid_vs_causal():
    # layout [U, O, O, I, I, I, E] (no padding)
    hybrid = TINY
    causal = dataclasses.replace(TINY, hybrid_attention=False)
    # hybrid: an O token reaches everyone; the middle I reaches itself, later I and E; E only itself
    assert _changed_slots(hybrid, 1).tolist() == [True] * 7
    assert _changed_slots(hybrid, 4).tolist() == [False] * 4 + [True] * 3
    assert _changed_slots(hybrid, 6).tolist() == [False] * 6 + [True]
    # causal: a slot reaches itself and every later slot only
    assert _changed_slots(causal, 1).tolist() == [False] + [True] * 6
    assert _changed_slots(causal, 4).tolist() == [False] * 4 + [True] * 3


def test_padding_content_is_ignored():
    torch.manual_seed(0)
    hsd = HSD(TINY).eval()
    tokens = make_tokens(layout(4, 4), 4, torch.Generator().manual_seed(3))
    pad = tokens.padding_mask
    assert pad.any()
    noisy = tokens._replace(dense_features=tokens.dense_features + pad[..., None] * 5.0)
    with torch.no_grad():
        a, b = hsd(tokens).hidden, hsd(noisy).hidden
    assert_close(a[~pad], b[~pad])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_token_aware_switches_change_parameter_count_exactly():
    d, hidden, n = TINY.d_model, TINY.ffn_mult * TINY.d_model, TINY.n_layers
    ffn = d * hidden + hidden + hidden * d + d  # one MLP
    full = _count(GPRModel(TINY))
    no_ffn = _count(GPRModel(dataclasses.replace(TINY, token_aware_ffn=False)))
    no_ln = _count(GPRModel(dataclasses.replace(TINY, token_aware_ln=False)))
    assert full - no_ffn == n * 3 * ffn  # 4 FFNs -> 1 in every block
    assert full - no_ln == n * 2 * 3 * 2 * d  # 2 LNs per block, 4 -> 1 (gain + bias) each
    # with both off every type shares one FFN: outputs do not depend on which FFN index a type has
    shared = GPRModel(dataclasses.replace(TINY, token_aware_ffn=False))
    assert all(len(b.ffn.mlps) == 1 for b in shared.hsd.blocks)


def test_mor_gates_straight_through():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, mixture_of_recursions=True, max_recursions=3)
    hsd = HSD(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    g = hsd.router_gates(x)  # (B, T, R)
    hard = g.detach().round()
    assert_close(g.detach(), hard, atol=1e-6, rtol=0)  # 0/1 forward (up to the soft - soft rounding)
    assert torch.equal(hard[..., 0], torch.ones(2, 5))  # every token gets at least one pass
    assert (hard[..., 1:] <= hard[..., :-1]).all()  # depth r+1 only after depth r
    assert hard[..., 1:].sum() > 0 and (1 - hard).sum() > 0  # the router does route
    g.sum().backward()
    assert hsd.router.weight.grad is not None and hsd.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("d_model", 0), ("n_heads", 3), ("level_sizes", ()), ("hybrid_attention", 1), ("max_recursions", 0)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


# -- token-aware FFN without data-dependent shapes (grouped / chunked vs the boolean-indexing loop) ----------
from gpr_sim.model.hsd import TypedFFN, TypedLayerNorm, permute_rows, rows_of_type  # noqa: E402


def _ffn_inputs(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, TINY.d_model, generator=gen)
    types = torch.randint(0, 4, (b, t), generator=gen)
    return x, types


@pytest.mark.parametrize("impl", ["chunked", "grouped"])
@pytest.mark.parametrize(("b", "t"), [(1, 1), (3, 7), (5, 40), (2, 300)])
def test_typed_ffn_impls_match_the_loop(impl, b, t):
    torch.manual_seed(0)
    ffn = TypedFFN(TINY.d_model, 2 * TINY.d_model, 4)
    x, types = _ffn_inputs(b, t)
    types[0, 0] = 2  # a type may also be missing entirely (t=1)
    with torch.no_grad():
        ffn.impl = "loop"
        want = ffn(x, types)
        ffn.impl = impl
        got = ffn(x, types)
    assert got.shape == want.shape
    assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_typed_ffn_counting_sort_equals_stable_sort(n):
    """The counting sort gives torch.sort's stable order exactly, its inverse, and the type counts."""
    gen = torch.Generator().manual_seed(n)
    tf = torch.randint(0, 3, (n,), generator=gen)  # type 3 never occurs
    st, perm, inv, counts = TypedFFN(8, 16, 4)._sort(tf)
    want_st, want_perm = torch.sort(tf, stable=True)
    assert torch.equal(st, want_st) and torch.equal(perm, want_perm)
    assert torch.equal(inv[perm], torch.arange(n))
    assert counts.tolist() == [int((tf == t).sum()) for t in range(4)]


@pytest.mark.parametrize("impl", ["chunked", "grouped"])
def test_typed_ffn_gradients_match_the_loop(impl):
    torch.manual_seed(0)
    ffn = TypedFFN(TINY.d_model, 2 * TINY.d_model, 4)
    x, types = _ffn_inputs(4, 9, seed=1)
    grads = {}
    for name in ("loop", impl):
        ffn.impl = name
        ffn.zero_grad()
        xi = x.clone().requires_grad_()
        (ffn(xi, types) ** 2).sum().backward()
        grads[name] = [xi.grad] + [p.grad.clone() for p in ffn.parameters()]
    for a, b in zip(grads["loop"], grads[impl], strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def _grads_agree(fast, ref, src: torch.Tensor, weight: torch.Tensor) -> None:
    a, b = src.clone().requires_grad_(), src.clone().requires_grad_()
    out_a, out_b = fast(a), ref(b)
    (out_a * weight).sum().backward()
    (out_b * weight).sum().backward()
    assert torch.equal(out_a, out_b)
    assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


def test_rows_of_type_and_permute_rows_match_indexing_with_gradients():
    """The GEMM / gather backwards equal autograd's scatter-add of plain indexing (float64)."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    ids = torch.randint(0, 4, (7, 11), generator=gen)  # row 4 never used: its gradient is 0
    _grads_agree(
        lambda t: rows_of_type(t, ids, gemm=True),
        lambda t: t[ids],
        table,
        torch.randn(7, 11, 6, dtype=torch.float64, generator=gen),
    )
    perm = torch.randperm(13, generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(13)
    _grads_agree(
        lambda t: permute_rows(t, perm, inv),
        lambda t: t[perm],
        torch.randn(13, 6, dtype=torch.float64, generator=gen),
        torch.randn(13, 6, dtype=torch.float64, generator=gen),
    )


def test_typed_layer_norm_gradients_match_indexing():
    torch.manual_seed(0)
    ln = TypedLayerNorm(8, 4)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 8, requires_grad=True)
    types = torch.randint(0, 4, (3, 5))
    (ln(x, types) ** 2).sum().backward()
    got = [x.grad.clone(), ln.weight.grad.clone(), ln.bias.grad.clone()]
    x.grad = ln.weight.grad = ln.bias.grad = None
    ref = F.layer_norm(x, (8,)) * ln.weight[types] + ln.bias[types]
    (ref**2).sum().backward()
    for a, b in zip(got, [x.grad, ln.weight.grad, ln.bias.grad], strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_typed_ffn_keeps_checkpoint_keys():
    keys = set(TypedFFN(8, 16, 4).state_dict())
    want = {f"mlps.{t}.{layer}.{p}" for t in range(4) for layer in ("fc", "proj") for p in ("weight", "bias")}
    assert keys == want


@pytest.mark.parametrize("impl", ["chunked", "grouped"])
def test_hsd_forward_same_for_every_ffn_impl(impl, monkeypatch):
    torch.manual_seed(0)
    hsd = HSD(TINY).eval()
    tokens = make_tokens(layout(4, 5), 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        monkeypatch.setattr(TypedFFN, "impl", "loop")
        want = hsd(tokens).hidden
        monkeypatch.setattr(TypedFFN, "impl", impl)
        got = hsd(tokens).hidden
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_typed_ffn_rejects_unknown_impl():
    ffn = TypedFFN(8, 16, 4)
    ffn.impl = "nope"
    with pytest.raises(ValueError, match="impl"):
        ffn(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_typed_ffn_auto_has_no_host_sync_on_gpu(dtype):
    torch.manual_seed(0)
    ffn = TypedFFN(64, 128, 4).cuda()
    x = torch.randn(8, 40, 64, device="cuda")
    types = torch.randint(0, 4, (8, 40), device="cuda")
    with torch.no_grad():
        ffn.impl = "loop"
        want = ffn(x, types)
        ffn.impl = "auto"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                got = ffn(x, types)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mor", [False, True])
def test_append_rollout_step_equals_full_forward_of_the_next_request(mor):
    """Rollout step: old E masked in the cache, [I_new, E_new] appended == full forward of the new layout."""
    from gpr_sim.model.hsd import KVCache

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, mixture_of_recursions=mor)
    hsd = HSD(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    ho, hi = 3, 4
    nxt = make_tokens(layout(ho, hi + 2), 3, gen, cfg)  # the next request: two more ads in the history
    prev_types = layout(ho, hi)
    t0 = len(prev_types)
    # the previous request: the same U/O/first-hi I slots, then its own E (other context features)
    old_e = make_tokens([TYPE_E], 3, gen, cfg)
    old_e = old_e._replace(positions=nxt.positions[:, t0 - 1 : t0])  # E follows the same real tokens
    prev = TokenBatch(*(torch.cat([a[:, : t0 - 1], b], 1) for a, b in zip(nxt, old_e, strict=True)))
    with torch.no_grad():
        full = hsd(nxt).hidden  # (B, T0 + 2, C)
        pre = hsd(prev)
        pad = pre.cache.padding_mask.clone()
        pad[:, t0 - 1] = True  # the old E: seen by no later query
        cache = KVCache(pre.cache.layers, pre.cache.type_ids, pad)
        new = slots(nxt, t0 - 1)  # [I, I, E_new]
        app = hsd.append(new, cache)
        assert_close(app.hidden, full[:, t0 - 1 :], atol=1e-5, rtol=1e-5)
        ref = hsd(new, cache)  # the concatenating cache path agrees too
        assert_close(app.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
        for a, r in zip(app.cache.layers, ref.cache.layers, strict=True):
            assert_close(a.k, r.k[:, :, t0:], atol=1e-5, rtol=1e-5)
            assert_close(a.v, r.v[:, :, t0:], atol=1e-5, rtol=1e-5)
    assert app.cache.type_ids.shape == (3, 3)


# -- the typed FFN per run of slots of one type (the slot layout read once by the caller) --------------------
from gpr_sim.model.hsd import type_segments  # noqa: E402


def test_type_segments_are_the_runs_of_the_shared_layout():
    tokens = make_tokens(layout(2, 3), 4, torch.Generator().manual_seed(0))
    assert type_segments(tokens.type_ids) == ((0, 1, TYPE_U), (1, 3, TYPE_O), (3, 6, TYPE_I), (6, 7, TYPE_E))
    mixed = tokens.type_ids.clone()
    mixed[1, 2] = TYPE_I  # one row differs: no shared layout
    assert type_segments(mixed) is None
    assert type_segments(mixed[:0]) is None  # no rows: nothing to read
    assert type_segments(mixed[:, :0]) is None  # no slots either


def test_typed_ffn_by_segments_equals_the_loop_with_gradients():
    """Dense GEMMs per run of slots give the loop's values and gradients (padding slots keep their type)."""
    torch.manual_seed(0)
    ffn = TypedFFN(TINY.d_model, 2 * TINY.d_model, 4)
    tokens = make_tokens(layout(3, 4), 5, torch.Generator().manual_seed(1))
    x = torch.randn(5, tokens.type_ids.shape[1], TINY.d_model, generator=torch.Generator().manual_seed(2))
    segments = type_segments(tokens.type_ids)
    grads = {}
    for name, seg in (("loop", None), ("segments", segments)):
        ffn.impl = "loop"
        ffn.zero_grad()
        xi = x.clone().requires_grad_()
        out = ffn(xi, tokens.type_ids, seg)
        (out**2).sum().backward()
        grads[name] = [out.detach(), xi.grad] + [p.grad.clone() for p in ffn.parameters()]
    for a, b in zip(grads["loop"], grads["segments"], strict=True):
        assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segments cover 4 slots, the tokens have 9"):
        ffn(x, tokens.type_ids, ((0, 4, TYPE_U),))


def test_typed_layer_norm_by_segments_equals_per_token_with_gradients():
    """The per-slot affine (the layout known) gives the per-token gathers' values and gradients, and a 1-type
    norm (the fused affine) equals the plain LayerNorm."""
    torch.manual_seed(0)
    ln = TypedLayerNorm(TINY.d_model, 4)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    tokens = make_tokens(layout(3, 4), 5, torch.Generator().manual_seed(1))
    x = torch.randn(5, tokens.type_ids.shape[1], TINY.d_model, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, seg in (("tokens", None), ("segments", type_segments(tokens.type_ids))):
        ln.zero_grad()
        xi = x.clone().requires_grad_()
        out = ln(xi, tokens.type_ids, seg)
        (out**2).sum().backward()
        grads[name] = [out.detach(), xi.grad, ln.weight.grad.clone(), ln.bias.grad.clone()]
    for a, b in zip(grads["tokens"], grads["segments"], strict=True):
        assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segments cover 4 slots, the tokens have 9"):
        ln(x, tokens.type_ids, ((0, 4, TYPE_U),))
    shared = TypedLayerNorm(TINY.d_model, 1)
    with torch.no_grad():
        shared.weight.normal_()
        shared.bias.normal_()
    want = torch.nn.LayerNorm(TINY.d_model)
    want.load_state_dict({"weight": shared.weight[0], "bias": shared.bias[0]})
    assert_close(shared(x, tokens.type_ids), want(x))


def test_table_embedding_equals_a_lookup_per_table_with_gradients():
    """The one ``embedding_bag`` over the concatenated tables equals the reference's lookup per table, masked and
    summed (itself checked token by token: codes of -1 and non-I events embed to nothing), gradients included."""
    torch.manual_seed(0)
    hsd = HSD(TINY)
    tokens = make_tokens(layout(3, 4), 5, torch.Generator().manual_seed(1))
    tables = [e.weight for e in hsd.code_emb] + [
        hsd.event_emb.weight,
        hsd.type_emb.weight,
        hsd.pos_emb.weight,
    ]
    want = torch.zeros(*tokens.type_ids.shape, TINY.d_model)
    for b, t in torch.cartesian_prod(*(torch.arange(n) for n in tokens.type_ids.shape)).tolist():
        codes = tokens.semantic_codes[b, t].tolist()
        row = sum(emb.weight[c] for emb, c in zip(hsd.code_emb, codes, strict=True) if c >= 0)
        if tokens.type_ids[b, t] == TYPE_I:
            row = row + hsd.event_emb.weight[tokens.event_ids[b, t]]
        want[b, t] = (
            row + hsd.type_emb.weight[tokens.type_ids[b, t]] + hsd.pos_emb.weight[tokens.positions[b, t]]
        )
    grads = {}
    for name in ("table_lookups", "table_embedding"):
        hsd.zero_grad()
        out = getattr(hsd, name)(tokens)
        assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)
        (out**2).sum().backward()
        grads[name] = [t.grad.clone() for t in tables]
    for a, b in zip(grads["table_lookups"], grads["table_embedding"], strict=True):
        assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert "bag_starts" not in hsd.state_dict()  # checkpoints keep their keys
    hsd.bag_embed = "sometimes"
    with pytest.raises(ValueError, match="HSD.bag_embed='sometimes' is invalid"):
        hsd.embed(tokens)


@pytest.mark.parametrize("mor", [False, True])
def test_hsd_forward_with_segments_equals_without(mor):
    cfg = dataclasses.replace(TINY, mixture_of_recursions=mor)
    torch.manual_seed(0)
    hsd = HSD(cfg).eval()
    tokens = make_tokens(layout(4, 5), 3, torch.Generator().manual_seed(2), cfg)
    with torch.no_grad():
        want = hsd(tokens).hidden
        got = hsd(tokens, segments=type_segments(tokens.type_ids)).hidden
    assert_close(got, want, atol=1e-5, rtol=1e-5)
