"""Prefix trie: masks admit exactly the valid prefixes (brute force), with and without eligibility."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpr_sim.tokenizer import PrefixTrie, SemanticIdTable

# Four items, depth 2, K = 3:  item 0 -> (0, 2), item 1 -> (2, 0), item 2 -> (0, 1), item 3 -> (2, 0)
PATHS = torch.tensor([[0, 2], [2, 0], [0, 1], [2, 0]])


def test_hand_worked_structure():
    trie = PrefixTrie(PATHS, 3)
    # sorted paths: (0,1) item 2, (0,2) item 0, (2,0) item 1, (2,0) item 3
    assert trie.order.tolist() == [2, 0, 1, 3]
    assert trie.num_nodes == [1, 2, 3]  # root; prefixes (0), (2); paths (0,1), (0,2), (2,0)
    assert trie.children[0].tolist() == [[0, -1, 1]]  # root: code 0 -> node 0, code 2 -> node 1
    assert trie.children[1].tolist() == [[-1, 0, 1], [2, -1, -1]]
    assert trie.node_start[2].tolist() == [0, 1, 2, 4]  # leaf (2,0) covers sorted items 2..3
    masks = trie.prefix_mask(torch.tensor([[0], [2], [1]]))
    assert masks.tolist() == [[False, True, True], [True, False, False], [False, False, False]]


def test_eligibility_hand_worked():
    trie = PrefixTrie(PATHS, 3)
    # only item 0 = (0, 2) eligible: at the root only code 0 leads to it; under (0) only code 2
    eligible = torch.tensor([True, False, False, False])
    assert trie.prefix_mask(torch.zeros(1, 0, dtype=torch.int64), eligible).tolist() == [[True, False, False]]
    assert trie.prefix_mask(torch.tensor([[0]]), eligible).tolist() == [[False, False, True]]
    # per-row masks: row 0 may see item 3 only, row 1 item 2 only
    per_row = torch.tensor([[False, False, False, True], [False, False, True, False]])
    root_mask = trie.prefix_mask(torch.zeros(2, 0, dtype=torch.int64), per_row)
    assert root_mask.tolist() == [[False, False, True], [True, False, False]]


def test_decoding_walk_recovers_every_item():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 5, (500, 3), generator=g)
    table = SemanticIdTable(codes, codebook_size=5)
    trie = PrefixTrie(table.item_to_path, table.level_sizes)
    node = trie.root(500)
    for d in range(trie.depth):
        legal = trie.legal_mask(node, d)
        assert bool(legal.gather(1, table.item_to_path[:, d : d + 1]).all())  # each true path stays legal
        node = trie.next_node(node, table.item_to_path[:, d], d)
    assert torch.equal(trie.leaf_item(node), torch.arange(500))


def test_illegal_steps_fall_off_the_trie():
    trie = PrefixTrie(PATHS, 3)
    node = trie.next_node(trie.root(3), torch.tensor([1, 0, 7]), 0)  # 1: no item; 7: out of range
    assert node.tolist() == [-1, 0, -1]
    assert trie.legal_mask(node, 1).tolist()[0] == [False, False, False]
    assert trie.leaf_item(torch.tensor([-1, 2])).tolist() == [-1, 1]
    with pytest.raises(ValueError, match="depth"):
        trie.legal_mask(node, 2)
    with pytest.raises(ValueError, match="paths must lie"):
        PrefixTrie(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match="eligible"):
        trie.legal_mask(trie.root(1), 0, torch.ones(3, dtype=torch.bool))


def _brute_force_masks(paths: list[list[int]], sizes: list[int], eligible: list[list[bool]], depth: int):
    """For every prefix of length ``depth`` (all K^depth of them) and row, the set-based legal mask."""
    prefixes = list(itertools.product(*[range(k) for k in sizes[:depth]]))
    expected = []
    for row_elig in eligible:
        valid = {tuple(p[: depth + 1]) for p, ok in zip(paths, row_elig, strict=True) if ok}
        expected.append([[tuple(pre) + (c,) in valid for c in range(sizes[depth])] for pre in prefixes])
    return torch.tensor(prefixes, dtype=torch.int64).reshape(len(prefixes), depth), torch.tensor(expected)


@st.composite
def trie_cases(draw):
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 4)) for _ in range(depth)]
    n = draw(st.integers(1, 25))
    paths = [[draw(st.integers(0, k - 1)) for k in sizes] for _ in range(n)]
    rows = draw(st.integers(1, 3))
    eligible = [[draw(st.booleans()) for _ in range(n)] for _ in range(rows)]
    return paths, sizes, eligible


@settings(max_examples=60, deadline=None)
@given(case=trie_cases(), dense=st.booleans())
def test_masks_match_brute_force(case, dense):
    paths, sizes, eligible = case
    # dense child tables, or binary search over child keys, with a tiny eligibility block (row chunking)
    trie = PrefixTrie(
        torch.tensor(paths), sizes, dense_table_limit=1 << 20 if dense else 0, eligibility_block=1
    )
    all_items = [[True] * len(paths)]
    for depth in range(len(sizes)):
        prefixes, expected = _brute_force_masks(paths, sizes, all_items, depth)
        assert torch.equal(trie.prefix_mask(prefixes), expected[0])
        # per-row eligibility: every prefix tested against every eligibility row
        _, expected_rows = _brute_force_masks(paths, sizes, eligible, depth)  # (R, P, K)
        r, p = expected_rows.shape[:2]
        rows_elig = torch.tensor(eligible).repeat_interleave(p, 0)  # (R*P, N): row-major over (r, prefix)
        got = trie.prefix_mask(prefixes.repeat(r, 1), rows_elig).reshape(r, p, -1)
        assert torch.equal(got, expected_rows)
        # one shared (N,) eligibility row equals the per-row result for that row
        shared = trie.prefix_mask(prefixes, torch.tensor(eligible[0]))
        assert torch.equal(shared, expected_rows[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    paths = torch.randint(0, 6, (2000, 3), generator=g)
    eligible = torch.rand(64, 2000, generator=g) < 0.1
    prefixes = paths[:64, :2]
    cpu = PrefixTrie(paths, 6).prefix_mask(prefixes, eligible)
    gpu = PrefixTrie(paths.cuda(), 6).prefix_mask(prefixes.cuda(), eligible.cuda())
    assert torch.equal(cpu, gpu.cpu())
