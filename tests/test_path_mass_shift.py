"""benchmarks/path_mass_shift.py's mass on distinct paths, by hand (the end-to-end run: tests/test_hepo.py)."""

import math

import pytest
import torch

from benchmarks.path_mass_shift import distinct_mass


def test_distinct_mass_counts_a_path_drawn_twice_once():
    # row 0: paths (1, 2), (1, 2) again, (3, 0); row 1: three distinct paths
    codes = torch.tensor([[[1, 2], [1, 2], [3, 0]], [[0, 0], [0, 1], [4095, 4095]]])
    log_prob = torch.log(torch.tensor([[0.5, 0.5, 0.25], [0.1, 0.2, 0.3]]))
    torch.testing.assert_close(distinct_mass(codes, log_prob), torch.tensor([0.75, 0.6]))


def test_distinct_mass_refuses_paths_its_key_cannot_hold():
    with pytest.raises(ValueError, match="codes < 4096"):
        distinct_mass(torch.tensor([[[4096, 0]]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="at most 5 levels"):
        distinct_mass(torch.zeros(1, 1, 6, dtype=torch.int64), torch.full((1, 1), math.log(0.5)))
