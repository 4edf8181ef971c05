"""Unique invertible semantic IDs: the disambiguation rule, round trips, organic/ad split."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpr_sim.tokenizer import AD, ORGANIC, SemanticIdTable

CODES = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [1, 1]])


def test_disambiguation_rule_hand_worked():
    table = SemanticIdTable(CODES, codebook_size=4)
    # (0,1) is held by items 0, 2, 3 -> digits 0, 1, 2 in item order; (2,3) by 1, 4 -> 0, 1; item 5 alone -> 0
    assert table.item_to_path[:, 2].tolist() == [0, 0, 1, 2, 1, 0]
    assert table.num_dis == 3  # the largest group has 3 items
    assert table.level_sizes == (4, 4, 3)
    assert table.path_to_item(torch.tensor([[0, 1, 2], [2, 3, 1], [1, 1, 0]])).tolist() == [3, 4, 5]


def test_no_collisions_gives_a_constant_zero_digit():
    table = SemanticIdTable(torch.tensor([[0, 0], [0, 1], [1, 0]]), codebook_size=2)
    assert table.num_dis == 1
    assert table.item_to_path[:, 2].tolist() == [0, 0, 0]


def test_round_trip_every_item_and_unique_paths():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (3000, 3), generator=g)  # 3000 items in 64 paths: many collisions
    table = SemanticIdTable(codes, codebook_size=4)
    items = torch.arange(3000)
    assert torch.equal(table.path_to_item(table.item_to_path), items)  # item -> path -> item
    assert torch.unique(table.item_to_path, dim=0).shape[0] == 3000  # no two items share a path
    assert torch.equal(table.item_to_path[:, :3], codes)  # the quantiser digits are kept
    assert table.num_dis == int(torch.unique(codes, dim=0, return_counts=True)[1].max())


def test_unknown_and_out_of_range_paths_give_minus_one():
    table = SemanticIdTable(CODES, codebook_size=4)
    queries = torch.tensor(
        [
            [0, 1, 0],  # known: item 0
            [3, 3, 0],  # in range but nobody has (3, 3)
            [5, 1, 1],  # level-1 digit 5 >= K = 4
            [0, 1, 3],  # disambiguation digit 3 >= K_dis = 3
            [-1, 1, 0],  # negative digit
            [1, 1, 1],  # (1, 1) has only digit 0
        ]
    )
    assert table.path_to_item(queries).tolist() == [0, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="paths must be"):
        table.path_to_item(torch.zeros(2, 2, dtype=torch.int64))


def test_organic_and_ads_share_one_space():
    organic = torch.tensor([[0, 1], [2, 2]])
    ads = torch.tensor([[0, 1], [3, 0], [0, 1]])
    table = SemanticIdTable.from_parts(organic, ads, codebook_size=4)
    # global ids: organic 0, 1; ads 2, 3, 4. Path (0,1) is shared by organic 0 and ads 0, 2 -> digits 0, 1, 2
    assert table.num_organic == 2 and table.num_ads == 3
    assert table.ad_paths.tolist() == [[0, 1, 1], [3, 0, 0], [0, 1, 2]]
    kind, local = table.split(torch.tensor([0, 1, 2, 3, 4, -1]))
    assert kind.tolist() == [ORGANIC, ORGANIC, AD, AD, AD, -1]
    assert local.tolist() == [0, 1, 0, 1, 2, -1]
    assert table.ad_ids(torch.tensor([0, 2])).tolist() == [2, 4]
    assert table.organic_ids(torch.tensor([1])).tolist() == [1]
    # an ad's path resolves back to the ad
    ad2 = table.path_to_item(table.ad_paths[2:3])
    assert table.split(ad2)[1].tolist() == [2]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="codes must lie in"):
        SemanticIdTable(torch.tensor([[0, 4]]), codebook_size=4)
    with pytest.raises(ValueError, match="num_organic"):
        SemanticIdTable(CODES, codebook_size=4, num_organic=7)
    with pytest.raises(ValueError, match="overflows"):
        SemanticIdTable(torch.zeros(2, 8, dtype=torch.int64), codebook_size=1 << 16)


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2), min_size=1, max_size=40),
    num_organic=st.integers(0, 40),
)
def test_round_trip_property(data, num_organic):
    codes = torch.tensor(data)
    num_organic = min(num_organic, len(data))
    table = SemanticIdTable(codes, codebook_size=3, num_organic=num_organic)
    n = len(data)
    assert torch.equal(table.path_to_item(table.item_to_path), torch.arange(n))
    kind, local = table.split(torch.arange(n))
    rebuilt = torch.where(kind == AD, table.ad_ids(local), table.organic_ids(local))
    assert torch.equal(rebuilt, torch.arange(n))
    assert int(table.item_to_path[:, 2].max()) == table.num_dis - 1
