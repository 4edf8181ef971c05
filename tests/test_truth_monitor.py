"""agents.rl.rollout's reward-model monitor: the sampled ads of every real request valued under the simulator's
truth beside the reward the learner is paid (``truth_monitor``, ``rollout/truth/*``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from agents.rl.rollout import Roller, truth_monitor
from gpr_sim.model import GPRModel
from tests.test_rollout_incremental import _market


def test_truth_monitor_sums_match_a_hand_computed_case():
    """Two groups of three candidates, one slot without an ad: the mean truth value divides by K (as the
    rewarded group value does), and the cross / square sums are those of the values centred inside each group
    over its ads only, so their ratio is numpy's correlation of the centred values."""
    reward = torch.tensor([[1.0, 2.0, 6.0], [3.0, 0.0, 5.0]])
    truth = torch.tensor([[2.0, 1.0, 3.0], [1.0, 0.0, 4.0]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    got = truth_monitor(reward, truth, valid).tolist()
    assert math.isclose(got[0], (6.0 / 3) + (5.0 / 3))
    r = np.array([1 - 3, 2 - 3, 6 - 3, 3 - 4, 5 - 4], dtype=float)  # centred over the group's ads
    t = np.array([2 - 2, 1 - 2, 3 - 2, 1 - 2.5, 4 - 2.5], dtype=float)
    assert np.allclose(got[1:], [(r * t).sum(), (r * r).sum(), (t * t).sum()])
    corr = got[1] / math.sqrt(got[2] * got[3])
    assert math.isclose(corr, float(np.corrcoef(r, t)[0, 1]), rel_tol=1e-12)  # both centred: the same


def _collect(estimator: str, budget_aware: bool):
    env, tok, cfg = _market()
    torch.manual_seed(0)
    model = GPRModel(cfg).eval()
    roller = Roller(
        env, tok, group_size=6, estimator=estimator, arr_rate=1.0, seed=5, budget_aware=budget_aware
    )
    buf, stats = roller.collect(model, 2)
    return buf.codes, stats


def test_rollout_logs_the_reward_models_agreement_with_truth():
    """Rewarded by the truth itself, the monitor reads back the group value and a correlation of 1 (with and
    without the budget share); rewarded by the privileged noisy estimate, the same sampled paths (the monitor
    draws nothing) get the truth-rewarded run's value as their truth value, which differs from the rewarded one,
    and a correlation strictly between 0 and 1 (without the budget share, which the estimator's own expected
    charges set)."""
    for budget_aware in (True, False):
        _, exact = _collect("truth", budget_aware)
        assert math.isclose(
            exact["rollout/truth/group_value_mean"], exact["rollout/group_value_mean"], rel_tol=1e-6
        )
        assert math.isclose(exact["rollout/truth/reward_corr"], 1.0, rel_tol=1e-9)
    codes, exact = _collect("truth", False)
    noisy_codes, noisy = _collect("privileged", False)
    assert torch.equal(codes, noisy_codes)
    assert math.isclose(
        noisy["rollout/truth/group_value_mean"], exact["rollout/group_value_mean"], rel_tol=1e-6
    )
    assert not math.isclose(
        noisy["rollout/group_value_mean"], noisy["rollout/truth/group_value_mean"], rel_tol=1e-3
    )
    assert 0.0 < noisy["rollout/truth/reward_corr"] < 1.0
