"""benchmarks/path_mass_shift.py's mass on distinct paths, by hand (the end-to-end run: tests/test_hepo.py)."""

import math

import torch

from benchmarks.path_mass_shift import distinct_mass


def test_distinct_mass_counts_a_path_drawn_twice_once():
    # row 0: paths (1, 2), (1, 2) again, (3, 0); row 1: three distinct paths
    codes = torch.tensor([[[1, 2], [1, 2], [3, 0]], [[0, 0], [0, 1], [4095, 4095]]])
    log_prob = torch.log(torch.tensor([[0.5, 0.5, 0.25], [0.1, 0.2, 0.3]]))
    torch.testing.assert_close(distinct_mass(codes, log_prob), torch.tensor([0.75, 0.6]))


def test_distinct_mass_keys_deep_paths_and_wide_codes():
    # six levels and codes past 4095: the tokenizer's mixed-radix key still tells the paths apart
    codes = torch.tensor([[[4096, 0, 0, 0, 0, 1], [4096, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]])
    log_prob = torch.full((1, 3), math.log(0.25))
    torch.testing.assert_close(distinct_mass(codes, log_prob), torch.tensor([0.5]))
