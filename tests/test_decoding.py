"""Trie-constrained beam search: equals exhaustive enumeration when wide, and only ever emits legal items."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpr_sim.decoding import beam_search
from gpr_sim.tokenizer import PrefixTrie

TABLE_ROWS = 997  # prime: the hash of (row, prefix) below spreads over the table


def hashed_table_fn(seed: int, width: int, scale: float = 2.0):
    """A deterministic random model: scores = a fixed random table row picked by a hash of (row, prefix)."""
    table = scale * torch.randn(TABLE_ROWS, width, generator=torch.Generator().manual_seed(seed))

    def fn(ctx: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        h = ctx * 7919 + prefix.shape[1] * 104729
        for j in range(prefix.shape[1]):
            h = h * 31 + prefix[:, j] + 1
        return table[h % TABLE_ROWS]

    return fn


def make_step_fn(seed: int, level_sizes):
    table_fn = hashed_table_fn(seed, max(level_sizes))
    return lambda ctx, prefix: table_fn(ctx, prefix)[:, : level_sizes[prefix.shape[1]]]


def make_value_fn(seed: int):
    table_fn = hashed_table_fn(seed, 1)
    return lambda ctx, prefix: table_fn(ctx, prefix)[:, 0]


def unique_paths(level_sizes, n: int, seed: int) -> torch.Tensor:
    """(n, L) distinct random paths: n distinct mixed-radix numbers below prod(level_sizes)."""
    flat = torch.randperm(math.prod(level_sizes), generator=torch.Generator().manual_seed(seed))[:n]
    cols = []
    for k in reversed(level_sizes):
        cols.append(flat % k)
        flat = flat // k
    return torch.stack(cols[::-1], 1)


def exhaustive(trie, paths, step_fn, batch_size, eligible=None, value_fn=None, value_weight=0.0):
    """Reference: score every item's path per row, legal-renormalised per level (trie.prefix_mask).

    Returns (B, N) log_prob and ranking score, -inf for items that are not legal/eligible for the row.
    """
    n = paths.shape[0]
    lp = torch.zeros(batch_size, n)
    for b in range(batch_size):
        row_el = None if eligible is None else (eligible if eligible.dim() == 1 else eligible[b])
        ctx = torch.full((n,), b)
        for d in range(trie.depth):
            legal = trie.prefix_mask(paths[:, :d], row_el)  # (N, K_d)
            logp = torch.log_softmax(step_fn(ctx, paths[:, :d]).masked_fill(~legal, -math.inf), -1)
            lp[b] += logp.masked_fill(~legal, -math.inf).gather(1, paths[:, d : d + 1]).squeeze(1)
    score = lp.clone()
    if value_fn is not None and value_weight != 0.0:
        for b in range(batch_size):
            score[b] += value_weight * value_fn(torch.full((n,), b), paths)
    return lp, score


def check_against_exhaustive(result, ref_lp, ref_score, top_k):
    ranked = ref_score.argsort(1, descending=True)[:, :top_k]  # (B, K)
    finite = ref_score.gather(1, ranked) > -math.inf
    expected_items = torch.where(finite, ranked, -1)
    assert torch.equal(result.items, expected_items)
    torch.testing.assert_close(result.log_prob, torch.where(finite, ref_lp.gather(1, ranked), -math.inf))


@pytest.mark.parametrize("eligibility", ["none", "shared", "per_row"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive(seed, eligibility):
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 20, seed)
    trie = PrefixTrie(paths, sizes)
    b = 3
    gen = torch.Generator().manual_seed(100 + seed)
    eligible = {
        "none": None,
        "shared": torch.rand(20, generator=gen) < 0.6,
        "per_row": torch.rand(b, 20, generator=gen) < 0.5,
    }[eligibility]
    step_fn = make_step_fn(seed, sizes)
    result = beam_search(step_fn, trie, b, beam_width=20, top_k=6, eligible=eligible)
    ref_lp, ref_score = exhaustive(trie, paths, step_fn, b, eligible)
    check_against_exhaustive(result, ref_lp, ref_score, 6)
    emitted = result.items >= 0
    assert torch.equal(result.codes[emitted], paths[result.items[emitted]])
    assert bool((result.codes[~emitted] == -1).all())
    assert result.value is None


def test_value_weighted_ranking_equals_exhaustive():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 25, seed=5)
    trie = PrefixTrie(paths, sizes)
    step_fn, value_fn = make_step_fn(5, sizes), make_value_fn(6)
    result = beam_search(step_fn, trie, 2, beam_width=25, top_k=8, value_fn=value_fn, value_weight=0.7)
    ref_lp, ref_score = exhaustive(trie, paths, step_fn, 2, value_fn=value_fn, value_weight=0.7)
    check_against_exhaustive(result, ref_lp, ref_score, 8)
    # the value column is value_fn of the emitted path, and the order is by log_prob + 0.7 * value
    ctx = torch.arange(2).repeat_interleave(8)
    torch.testing.assert_close(result.value.flatten(), value_fn(ctx, result.codes.view(16, 3)))
    score = result.log_prob + 0.7 * result.value
    assert bool((score[:, :-1] >= score[:, 1:]).all())


def test_value_weight_changes_the_ranking():
    # the same search with weight 0 ranks by log_prob alone; a large weight follows the value instead
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 36, seed=7)
    trie = PrefixTrie(paths, sizes)
    step_fn, value_fn = make_step_fn(7, sizes), make_value_fn(8)
    plain = beam_search(step_fn, trie, 1, beam_width=36, top_k=1, value_fn=value_fn)
    guided = beam_search(step_fn, trie, 1, beam_width=36, top_k=1, value_fn=value_fn, value_weight=100.0)
    all_values = value_fn(torch.zeros(36, dtype=torch.int64), paths)
    assert guided.items.item() == all_values.argmax().item()
    assert plain.items.item() != guided.items.item()


def test_narrow_beam_emits_legal_distinct_items():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 30, seed=3)
    trie = PrefixTrie(paths, sizes)
    eligible = torch.rand(4, 30, generator=torch.Generator().manual_seed(3)) < 0.5
    result = beam_search(make_step_fn(3, sizes), trie, 4, beam_width=3, top_k=3, eligible=eligible)
    for b in range(4):
        items = result.items[b].tolist()
        assert -1 not in items  # 3 <= eligible items in every row here
        assert len(set(items)) == 3
        assert all(bool(eligible[b, i]) for i in items)
        assert torch.equal(result.codes[b], paths[items])
    assert bool((result.log_prob[:, :-1] >= result.log_prob[:, 1:]).all())


def test_ineligible_prefix_is_pruned():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 36, seed=0)  # every path: the full product
    trie = PrefixTrie(paths, sizes)
    step_fn = make_step_fn(0, sizes)

    # make code 2 at the root overwhelmingly likely, then exclude everything under it
    def biased(ctx, prefix):
        boost = 50.0 * (torch.arange(sizes[prefix.shape[1]]) == 2) * (prefix.shape[1] == 0)
        return step_fn(ctx, prefix) + boost

    eligible = paths[:, 0] != 2
    free = beam_search(biased, trie, 1, beam_width=4, top_k=4)
    assert bool((free.codes[0, :, 0] == 2).all())
    pruned = beam_search(biased, trie, 1, beam_width=4, top_k=4, eligible=eligible)
    assert bool((pruned.codes[0, :, 0] != 2).all())
    assert bool((pruned.items >= 0).all())
    # log-probs renormalise over the legal codes: the root step no longer pays for the excluded code, so
    # the boost on it changes nothing and the search equals the unboosted one (a root step that still paid
    # for code 2 would cost each path ~50 nats)
    plain = beam_search(step_fn, trie, 1, beam_width=4, top_k=4, eligible=eligible)
    assert torch.equal(pruned.items, plain.items)
    torch.testing.assert_close(pruned.log_prob, plain.log_prob)


def test_rows_with_different_eligibility_in_one_call():
    sizes = (2, 2, 2)
    paths = unique_paths(sizes, 8, seed=0)
    trie = PrefixTrie(paths, sizes)
    eligible = torch.zeros(3, 8, dtype=torch.bool)
    eligible[0, 5] = True  # row 0: one item
    eligible[1, [1, 6]] = True  # row 1: two items
    # row 2: nothing eligible
    result = beam_search(make_step_fn(0, sizes), trie, 3, beam_width=4, top_k=3, eligible=eligible)
    assert result.items[0].tolist() == [5, -1, -1]
    assert sorted(result.items[1, :2].tolist()) == [1, 6] and result.items[1, 2].item() == -1
    assert result.items[2].tolist() == [-1, -1, -1]
    assert result.log_prob[0, 0].item() == 0.0  # one legal path: every level has one legal code
    assert bool((result.log_prob[2] == -math.inf).all())
    assert bool((result.codes[2] == -1).all())


def test_fewer_leaves_than_top_k_pads():
    paths = torch.tensor([[0, 1], [1, 0]])
    trie = PrefixTrie(paths, 2)
    result = beam_search(make_step_fn(0, (2, 2)), trie, 2, beam_width=5, top_k=4)
    assert result.items.shape == (2, 4) and result.codes.shape == (2, 4, 2)
    assert sorted(result.items[0, :2].tolist()) == [0, 1]
    assert result.items[:, 2:].tolist() == [[-1, -1], [-1, -1]]
    # two legal paths, each level with legal codes renormalised: probabilities sum to one
    torch.testing.assert_close(result.log_prob[:, :2].exp().sum(1), torch.ones(2))


def test_step_fn_sees_only_real_prefixes_and_batched_calls():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 15, seed=4)
    trie = PrefixTrie(paths, sizes)
    step_fn = make_step_fn(4, sizes)
    calls = []

    def recording(ctx, prefix):
        calls.append(prefix.shape[0])
        real = trie.node_of_prefix(prefix) >= 0
        assert bool(real.all()), "step_fn got a prefix that no item has"
        return step_fn(ctx, prefix)

    beam_search(recording, trie, 5, beam_width=4, top_k=2)
    assert len(calls) == 3  # one batched call per level, never per row
    assert calls[0] == 5  # the root: one beam per row


def test_width_quota_is_valid_and_no_narrower():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 30, seed=9)
    trie = PrefixTrie(paths, sizes)
    step_fn, value_fn = make_step_fn(9, sizes), make_value_fn(10)
    for t in (0.01, 1.0, 100.0):
        result = beam_search(step_fn, trie, 3, beam_width=6, top_k=6, value_fn=value_fn, width_temperature=t)
        assert bool((result.items >= 0).all())  # 30 leaves: always 6 full beams
        for b in range(3):
            assert len(set(result.items[b].tolist())) == 6
        assert torch.equal(result.codes, paths[result.items])


def test_bad_arguments_raise():
    trie = PrefixTrie(torch.tensor([[0, 1]]), 2)
    step_fn = make_step_fn(0, (2, 2))
    with pytest.raises(ValueError, match="top_k"):
        beam_search(step_fn, trie, 1, beam_width=2, top_k=3)
    with pytest.raises(ValueError, match="length"):
        beam_search(step_fn, trie, 1, beam_width=2, top_k=1, length=3)
    with pytest.raises(ValueError, match="value_fn"):
        beam_search(step_fn, trie, 1, beam_width=2, top_k=1, value_weight=1.0)
    with pytest.raises(ValueError, match="eligible"):
        beam_search(step_fn, trie, 2, beam_width=2, top_k=1, eligible=torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="step_fn returned"):
        beam_search(lambda c, p: torch.zeros(c.shape[0], 5), trie, 1, beam_width=2, top_k=1)


@st.composite
def search_cases(draw):
    depth = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 4), min_size=depth, max_size=depth)))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    paths = torch.stack([torch.randint(0, k, (n,), generator=gen) for k in sizes], 1)  # duplicates allowed
    b = draw(st.integers(1, 3))
    shape = draw(st.sampled_from(["none", "shared", "per_row"]))
    p = draw(st.floats(0.0, 1.0))
    eligible = {
        "none": None,
        "shared": torch.rand(n, generator=gen) < p,
        "per_row": torch.rand(b, n, generator=gen) < p,
    }[shape]
    w = draw(st.integers(1, 6))
    k = draw(st.integers(1, w))
    width_t = draw(st.sampled_from([None, 0.1, 10.0]))
    return sizes, paths, b, eligible, w, k, width_t, seed


@settings(max_examples=60, deadline=None)
@given(search_cases())
def test_property_only_legal_eligible_distinct_items(case):
    sizes, paths, b, eligible, w, k, width_t, seed = case
    trie = PrefixTrie(paths, sizes)
    value_fn = make_value_fn(seed + 1) if width_t is not None else None
    result = beam_search(
        make_step_fn(seed, sizes),
        trie,
        b,
        w,
        k,
        eligible=eligible,
        value_fn=value_fn,
        width_temperature=width_t,
    )
    assert result.items.shape == (b, k) and result.codes.shape == (b, k, len(sizes))
    for row in range(b):
        if eligible is None:
            el = torch.ones(paths.shape[0], dtype=torch.bool)
        else:
            el = eligible if eligible.dim() == 1 else eligible[row]
        items = result.items[row]
        emitted = items[items >= 0]
        # emitted items come first, are distinct, eligible, and their codes are their own paths
        assert bool((items[: emitted.numel()] >= 0).all())
        assert len(set(emitted.tolist())) == emitted.numel()
        assert bool(el[emitted].all())
        assert torch.equal(result.codes[row, : emitted.numel()], paths[emitted])
        assert bool((result.log_prob[row, : emitted.numel()] > -math.inf).all())
        assert bool((result.log_prob[row, emitted.numel() :] == -math.inf).all())
        # the search keeps min(W, legal leaves) beams, so it emits min(K, eligible distinct paths)
        n_leaves = len({tuple(x) for x in paths[el].tolist()})
        assert emitted.numel() == min(k, n_leaves)


def test_width_quota_hand_worked():
    # full trie over sizes (2, 4): item 4 * c0 + c1 has path (c0, c1). W = 4.
    # level 0 uniform: log p = log 1/2 for both. Level 1: under (0) uniform (log 1/4 each);
    # under (1) logits [10, 10, 0, 0], so (1,0), (1,1) get about log 1/2, (1,2), (1,3) about log e^-10/2.
    # plain beam: (1,0), (1,1) at log 1/4 beat every (0, x) at log 1/8, which fill the last two slots.
    # width quota, t = 1, value(0) = 10, value(1) = 0: share of (1) = e^-10 / (1 + e^-10) ~ 4.5e-5, so its
    # quota is ceil(4 * 4.5e-5) = 1 child, and (0) gets ceil(4 * 0.99995) = 4: in-quota candidates are
    # (1,0) and the four (0, x); the best four of them are (1,0) and three (0, x).
    paths = torch.cartesian_prod(torch.arange(2), torch.arange(4))
    trie = PrefixTrie(paths, (2, 4))

    def step_fn(ctx, prefix):
        if prefix.shape[1] == 0:
            return torch.zeros(ctx.shape[0], 2)
        peaked = torch.tensor([10.0, 10.0, 0.0, 0.0])
        return torch.where(prefix[:, :1] == 1, peaked, torch.zeros(4))

    def value_fn(ctx, prefix):
        return 10.0 * (prefix[:, 0] == 0).float()

    plain = beam_search(step_fn, trie, 1, beam_width=4, top_k=4)
    guided = beam_search(step_fn, trie, 1, beam_width=4, top_k=4, value_fn=value_fn, width_temperature=1.0)
    assert plain.items[0, :2].tolist() in ([4, 5], [5, 4])
    assert int((plain.codes[0, :, 0] == 0).sum()) == 2
    assert guided.items[0, 0].item() in (4, 5)  # the single in-quota child of (1) still ranks first
    assert int((guided.codes[0, :, 0] == 0).sum()) == 3
    assert bool((guided.log_prob[0, :-1] >= guided.log_prob[0, 1:]).all())


def test_shared_path_returns_an_eligible_item_of_the_leaf():
    # items 0 and 1 share the path (0, 0); item 2 is (1, 0). Sorted order: 0, 1, 2.
    # with item 0 ineligible, the leaf (0, 0) must decode to item 1 (its first eligible item), not item 0
    paths = torch.tensor([[0, 0], [0, 0], [1, 0]])
    trie = PrefixTrie(paths, 2)
    step_fn = make_step_fn(0, (2, 2))
    shared = beam_search(step_fn, trie, 1, beam_width=2, top_k=2, eligible=torch.tensor([False, True, True]))
    assert sorted(shared.items[0].tolist()) == [1, 2]
    per_row = torch.tensor([[False, True, False], [True, True, False]])
    result = beam_search(step_fn, trie, 2, beam_width=2, top_k=2, eligible=per_row)
    assert result.items.tolist() == [[1, -1], [0, -1]]
    unmasked = beam_search(step_fn, trie, 1, beam_width=2, top_k=2)
    assert sorted(unmasked.items[0].tolist()) == [0, 2]  # no mask: the leaf's first item


def test_binary_search_levels_agree_with_dense_tables():
    sizes = (4, 3, 3)
    paths = unique_paths(sizes, 25, seed=11)
    eligible = torch.rand(3, 25, generator=torch.Generator().manual_seed(11)) < 0.7
    step_fn, value_fn = make_step_fn(11, sizes), make_value_fn(12)
    kwargs = dict(eligible=eligible, value_fn=value_fn, value_weight=0.3, width_temperature=0.5)
    dense = beam_search(step_fn, PrefixTrie(paths, sizes), 3, 5, 4, **kwargs)
    sparse = beam_search(step_fn, PrefixTrie(paths, sizes, dense_table_limit=0), 3, 5, 4, **kwargs)
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    frac=st.floats(0.1, 1.0),
    p=st.floats(0.0, 1.0),
    value_weight=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_property_wide_beam_equals_exhaustive(sizes, frac, p, value_weight, seed):
    # with W >= #leaves every level keeps all legal prefixes, so the search is exhaustive; compared
    # through scores (tie-robust): the k-th returned score is the k-th best reference score
    n = max(1, int(frac * math.prod(sizes)))
    paths = unique_paths(sizes, n, seed)
    trie = PrefixTrie(paths, sizes)
    eligible = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < p
    step_fn, value_fn = make_step_fn(seed, sizes), make_value_fn(seed + 1)
    k = min(n, 5)
    result = beam_search(
        step_fn, trie, 2, n, k, eligible=eligible, value_fn=value_fn, value_weight=value_weight
    )
    ref_lp, ref_score = exhaustive(trie, paths, step_fn, 2, eligible, value_fn, value_weight)
    expected = ref_score.sort(1, descending=True).values[:, :k]
    got = result.log_prob + value_weight * result.value.nan_to_num(0.0)
    torch.testing.assert_close(got, expected)
    emitted = result.items >= 0
    assert torch.equal(emitted, expected > -math.inf)
    rows = torch.arange(2)[:, None].expand(-1, k)
    torch.testing.assert_close(ref_lp[rows[emitted], result.items[emitted]], result.log_prob[emitted])


def test_compiled_topk_equals_topk():
    """Under torch.compile a small width is taken by max passes: same values, same columns (no ties)."""
    from gpr_sim import decoding

    gen = torch.Generator().manual_seed(3)
    score = torch.randn(64, 40, generator=gen)
    score[:5, 3:] = -math.inf  # rows with fewer finite scores than the width: padding columns
    fused = torch.compile(decoding._topk, dynamic=False, fullgraph=True)
    for width in (1, 8, decoding.FUSED_TOPK_MAX, decoding.FUSED_TOPK_MAX + 4):
        want_v, want_i = score.topk(width, dim=1)
        got_v, got_i = fused(score, width)
        assert torch.equal(got_v, want_v)
        finite = want_v > -math.inf
        assert torch.equal(got_i[finite], want_i[finite])
    # a compiled beam search returns what the eager one does, dead beams included
    trie = PrefixTrie(unique_paths((6, 5, 4), 50, seed=1), (6, 5, 4))
    step = make_step_fn(7, (6, 5, 4))

    def search(width: int):
        return beam_search(step, trie, batch_size=9, beam_width=width, top_k=min(width, 5))

    for width in (5, 30):
        want, got = search(width), torch.compile(search, dynamic=False)(width)
        assert torch.equal(got.items, want.items) and torch.equal(got.codes, want.codes)
        torch.testing.assert_close(got.log_prob, want.log_prob)  # inductor's log_softmax rounds differently
