"""Prefix trie fast paths (CSR child ranges, consecutive-code levels, bool mask tables, one-key sort) give
exactly what the binary-search implementation they replaced gives, kept here as the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpr_sim.tokenizer import PrefixTrie, SemanticIdTable
from gpr_sim.tokenizer.trie import lexsort_rows


class ReferenceTrie:
    """The trie before the fast paths: column-by-column lexsort, and every (node, code) of a level without a
    dense table found by binary search over ``child_keys``."""

    def __init__(self, paths, level_sizes, dense_table_limit=1 << 26):
        n, depth = paths.shape
        self.level_sizes = [level_sizes] * depth if isinstance(level_sizes, int) else list(level_sizes)
        self.depth, self.num_items = depth, n
        self.order = torch.arange(n, device=paths.device)
        for col in reversed(range(depth)):
            self.order = self.order[torch.sort(paths[self.order, col], stable=True).indices]
        sp = paths[self.order]
        changed = torch.cumsum((sp[1:] != sp[:-1]).int(), 1) > 0
        first_row = torch.ones(1, dtype=torch.bool, device=paths.device)
        self.children, self.child_keys = [], []
        self.node_start, self.num_nodes = [torch.tensor([0, n], device=paths.device)], [1]
        parent = torch.zeros(n, dtype=torch.int64, device=paths.device)
        for d in range(depth):
            k = self.level_sizes[d]
            starts = torch.cat([first_row, changed[:, d]])
            node = torch.cumsum(starts, 0) - 1
            first = torch.nonzero(starts).squeeze(1)
            self.child_keys.append(parent[first] * k + sp[first, d])
            table = None
            if self.num_nodes[d] * k <= dense_table_limit:
                table = torch.full((self.num_nodes[d], k), -1, dtype=torch.int32, device=paths.device)
                table[parent[first], sp[first, d]] = torch.arange(
                    first.numel(), dtype=torch.int32, device=paths.device
                )
            self.children.append(table)
            self.node_start.append(torch.cat([first, first.new_tensor([n])]))
            self.num_nodes.append(first.numel())
            parent = node

    def _lookup(self, nodes, codes, depth):
        table = self.children[depth]
        if table is not None:
            return table[nodes, codes].long()
        keys = self.child_keys[depth]
        query = nodes * self.level_sizes[depth] + codes
        pos = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
        return torch.where(keys[pos] == query, pos, -1)

    def next_node(self, node_ids, codes, depth):
        k = self.level_sizes[depth]
        valid = (node_ids >= 0) & (codes >= 0) & (codes < k)
        return torch.where(valid, self._lookup(node_ids.clamp_min(0), codes.clamp(0, k - 1), depth), -1)

    def node_of_prefix(self, prefixes):
        node = torch.zeros(prefixes.shape[0], dtype=torch.int64, device=prefixes.device)
        for d in range(prefixes.shape[1]):
            node = self.next_node(node, prefixes[:, d], d)
        return node

    def legal_mask(self, node_ids, depth, eligible=None):
        k = self.level_sizes[depth]
        nodes = node_ids.clamp_min(0)
        codes = torch.arange(k, device=nodes.device).expand(nodes.shape[0], k)
        child = self._lookup(nodes[:, None].expand(-1, k), codes, depth)
        mask = (child >= 0) & (node_ids >= 0)[:, None]
        if eligible is not None:
            el = eligible[..., self.order]
            counts = torch.zeros(*el.shape[:-1], self.num_items + 1, dtype=torch.int32, device=el.device)
            counts[..., 1:] = torch.cumsum(el, -1, dtype=torch.int32)
            starts = self.node_start[depth + 1]
            lo, hi = starts[child.clamp_min(0)], starts[child.clamp_min(0) + 1]
            ok = counts[hi] > counts[lo] if el.dim() == 1 else counts.gather(1, hi) > counts.gather(1, lo)
            mask &= ok
        return mask


def assert_same(trie: PrefixTrie, ref: ReferenceTrie, paths: torch.Tensor, gen: torch.Generator) -> None:
    """Structure, every node's masks (plain, shared and per-row eligibility), every (node, code) step incl.
    off-trie nodes and out-of-range codes, and prefix masks of item prefixes, random prefixes and empty ones."""
    dev = trie.device
    assert torch.equal(trie.order, ref.order) and trie.num_nodes == ref.num_nodes
    for d in range(trie.depth):
        assert torch.equal(trie.child_keys[d], ref.child_keys[d])
        assert torch.equal(trie.node_start[d + 1], ref.node_start[d + 1])
        assert (trie.children[d] is None) == (ref.children[d] is None)
        if trie.children[d] is not None:
            assert torch.equal(trie.children[d], ref.children[d])
    shared = (torch.rand(trie.num_items, generator=gen) < 0.5).to(dev)
    for d in range(trie.depth):
        k = trie.level_sizes[d]
        nodes = torch.arange(-1, trie.num_nodes[d])  # every node and an off-trie row, shuffled
        nodes = nodes[torch.randperm(nodes.numel(), generator=gen)].to(dev)
        for eligible in (None, shared):
            assert torch.equal(trie.legal_mask(nodes, d, eligible), ref.legal_mask(nodes, d, eligible))
        few = nodes[:64]  # per-row eligibility is (B, N): a sample of the nodes
        per_row = (torch.rand(few.numel(), trie.num_items, generator=gen) < 0.3).to(dev)
        assert torch.equal(trie.legal_mask(few, d, per_row), ref.legal_mask(few, d, per_row))
        pairs = nodes.repeat_interleave(k + 2)
        codes = torch.arange(-1, k + 1, device=dev).repeat(nodes.numel())  # codes -1 and K included
        assert torch.equal(trie.next_node(pairs, codes, d), ref.next_node(pairs, codes, d))
        real = paths[torch.randint(trie.num_items, (24,), generator=gen).to(dev)]
        noise = torch.stack([torch.randint(kk, (24,), generator=gen) for kk in trie.level_sizes], 1).to(dev)
        for pre in (real[:, :d], noise[:, :d], torch.cat([real[:3, :d], noise[:3, :d]])):
            want = ref.legal_mask(ref.node_of_prefix(pre), d)
            assert torch.equal(trie.prefix_mask(pre), want)
            assert torch.equal(
                trie.prefix_mask(pre, shared), ref.legal_mask(ref.node_of_prefix(pre), d, shared)
            )


@st.composite
def random_tries(draw):
    depth = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 6)) for _ in range(depth)]
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    paths = torch.stack([torch.randint(k, (n,), generator=gen) for k in sizes], 1)
    return paths, sizes, gen


@settings(max_examples=80, deadline=None)
@given(case=random_tries(), limit=st.sampled_from([0, 30, 1 << 20]))
def test_random_tries_match_reference(case, limit):
    # limit 0: every level searched (compare path of consecutive levels, padded scatter of the others);
    # 30: small levels dense, wider ones searched with the (K+1, K) step table; 2^20: all dense
    paths, sizes, gen = case
    trie = PrefixTrie(paths, sizes, dense_table_limit=limit)
    assert_same(trie, ReferenceTrie(paths, sizes, dense_table_limit=limit), paths, gen)


def large_k_ad_paths(seed: int = 0):
    """A wide disambiguation level (K_dis in the hundreds, over more nodes than codes, as in the large world)
    whose ad digits start past the organic items of each collision group: consecutive codes with offsets."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.cat(
        [torch.randint(0, 16, (20000, 3), generator=gen), torch.zeros(400, 3, dtype=torch.int64)]
    )
    codes = codes[torch.randperm(codes.shape[0], generator=gen)]  # the big group spans organic and ads
    table = SemanticIdTable(codes, codebook_size=16, num_organic=12000)
    return table.ad_paths, table.level_sizes


@pytest.mark.parametrize("limit", [0, 1 << 18, 1 << 26])
def test_large_disambiguation_level_matches_reference(limit):
    # 0: nothing dense, the consecutive level compares codes; 2^18: dense first levels, the wide level
    # searched through its (K+1, K) step table; 2^26: everything dense
    paths, sizes = large_k_ad_paths()
    trie = PrefixTrie(paths, sizes, dense_table_limit=limit)
    last = trie.depth - 1
    assert sizes[last] > 300 and trie.num_nodes[last] > sizes[last]
    if limit < 1 << 26:
        assert trie.children[last] is None and trie.first_code[last] is not None  # the no-search path
        assert int(trie.first_code[last].max()) > 0  # ads' digits start past the organic items
        assert (trie._below[last] is not None) == (limit == 1 << 18)
    ref = ReferenceTrie(paths, sizes, dense_table_limit=limit)
    assert_same(trie, ref, paths, torch.Generator().manual_seed(1))


def test_non_consecutive_wide_level_matches_reference():
    # every other code of a wide level: no consecutive run, so children are scattered from padded slots
    gen = torch.Generator().manual_seed(2)
    paths = torch.stack(
        [torch.randint(3, (3000,), generator=gen), 2 * torch.randint(200, (3000,), generator=gen)], 1
    )
    trie = PrefixTrie(paths, [3, 400], dense_table_limit=0)
    assert trie.first_code[1] is None
    assert_same(trie, ReferenceTrie(paths, [3, 400], dense_table_limit=0), paths, gen)


def test_one_key_sort_equals_column_sorts_and_falls_back_on_overflow():
    gen = torch.Generator().manual_seed(3)
    paths = torch.randint(0, 5, (4000, 3), generator=gen)  # many exact ties: stability matters
    by_columns = lexsort_rows(paths)
    assert torch.equal(lexsort_rows(paths, [5, 5, 5]), by_columns)
    huge = [2**31, 2**31, 5]  # product past int64: the column sorts answer
    assert torch.equal(lexsort_rows(paths, huge), by_columns)


def test_masks_do_not_share_storage_with_the_trie():
    # the bool tables are gathered, never returned as views: a caller may edit a mask in place
    trie = PrefixTrie(torch.tensor([[0, 2], [2, 0], [0, 1]]), 3)
    mask = trie.prefix_mask(torch.tensor([[0]]))
    mask[:] = True
    assert trie.prefix_mask(torch.tensor([[0]])).tolist() == [[False, True, True]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_reference():
    paths, sizes = large_k_ad_paths()
    for limit in (0, 1 << 18, 1 << 26):
        trie = PrefixTrie(paths.cuda(), sizes, dense_table_limit=limit)
        ref = ReferenceTrie(paths.cuda(), sizes, dense_table_limit=limit)
        assert_same(trie, ref, paths.cuda(), torch.Generator().manual_seed(4))
        moved = PrefixTrie(paths, sizes, dense_table_limit=limit).to("cuda")
        assert_same(moved, ref, paths.cuda(), torch.Generator().manual_seed(5))
