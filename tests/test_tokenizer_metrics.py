"""Semantic-ID metrics on hand-worked examples (arithmetic in the comments)."""

import math

import pytest
import torch

from gpr_sim.tokenizer import (
    RQKmeans,
    RQKmeansConfig,
    codebook_utilization,
    collision_rate,
    group_paths,
    path_alignment_score,
    quantizer_metrics,
    reconstruction_mse,
)

# Six items, L = 2, K = 4. Groups: {A, B} share (0, 1); {C, D, E} share (2, 3); F alone at (1, 1).
CODES = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3], [2, 3], [1, 1]])
EMB = torch.tensor(
    [
        [1.0, 0.0],  # A
        [0.0, 1.0],  # B: cos(A, B) = 0
        [1.0, 0.0],  # C
        [3.0, 0.0],  # D: cos(C, D) = 1 (scale does not matter)
        [0.0, 2.0],  # E: cos(C, E) = cos(D, E) = 0
        [5.0, 5.0],  # F: alone, never paired
    ]
)


def test_group_paths():
    inverse, counts = group_paths(CODES)
    # groups in lexicographic order: (0,1) -> 0, (1,1) -> 1, (2,3) -> 2
    assert inverse.tolist() == [0, 0, 2, 2, 2, 1]
    assert counts.tolist() == [2, 1, 3]


def test_collision_rate_hand_worked():
    # A, B, C, D, E share their path with someone; F does not: 5 / 6
    assert collision_rate(CODES) == pytest.approx(5 / 6)
    assert collision_rate(torch.tensor([[0, 0], [0, 1], [1, 0]])) == 0.0
    assert collision_rate(torch.tensor([[3, 3], [3, 3]])) == 1.0


def test_codebook_utilization_hand_worked():
    cur = codebook_utilization(CODES, codebook_size=4)
    # level 1 uses {0, 2, 1} -> 3/4; level 2 uses {1, 3} -> 2/4
    torch.testing.assert_close(cur, torch.tensor([0.75, 0.5], dtype=torch.float64))


def test_pas_hand_worked():
    # pairs: (A,B) cos 0; (C,D) 1, (C,E) 0, (D,E) 0 -> 4 pairs, sum 1 -> PAS = 1/4
    assert path_alignment_score(CODES, EMB) == pytest.approx(0.25)


def test_pas_weights_pairs_not_groups():
    # group 1: 3 identical directions -> 3 pairs of cos 1; group 2: 2 opposite items -> 1 pair of cos -1
    # pair mean = (3 - 1) / 4 = 0.5 (a per-group mean would give (1 - 1) / 2 = 0)
    codes = torch.tensor([[0], [0], [0], [1], [1]])
    emb = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5], [1.0, 0.0], [-1.0, 0.0]])
    assert path_alignment_score(codes, emb) == pytest.approx(0.5)


def test_pas_nan_without_shared_paths():
    assert math.isnan(path_alignment_score(torch.tensor([[0], [1]]), torch.ones(2, 3)))


def test_pas_matches_brute_force_pairs():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (40, 2), generator=g)
    emb = torch.randn(40, 5, generator=g)
    u = torch.nn.functional.normalize(emb.double(), dim=1)  # float64, like the metric: compare at 1e-9
    cos, n = 0.0, 0
    for i in range(40):
        for j in range(i + 1, 40):
            if torch.equal(codes[i], codes[j]):
                cos += float(u[i] @ u[j])
                n += 1
    assert path_alignment_score(codes, emb) == pytest.approx(cos / n, abs=1e-9)


def test_reconstruction_mse_hand_worked():
    # errors 1, 0, 2, 0 over 2 x 2 entries: (1 + 0 + 4 + 0) / 4 = 1.25
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    assert reconstruction_mse(x, x_hat) == pytest.approx(1.25)


def test_quantizer_metrics_on_hand_set_codebooks():
    # 1 level, K = 2, codewords 0 and 10 (1-D). Items 1, -1, 9 -> codes 0, 0, 1.
    q = RQKmeans(RQKmeansConfig(num_levels=1, codebook_size=2), input_dim=1)
    q.codebooks[0] = torch.tensor([[0.0], [10.0]])
    m = quantizer_metrics(q, torch.tensor([[1.0], [-1.0], [9.0]]))
    assert m["collision_rate"] == pytest.approx(2 / 3)  # items 1 and -1 share code 0
    assert m["cur_l1"] == 1.0  # both codes used
    assert m["pas"] == pytest.approx(-1.0)  # cos(1, -1) = -1: a collided pair pointing apart
    assert m["recon_mse"] == pytest.approx(1.0)  # squared errors 1, 1, 1
