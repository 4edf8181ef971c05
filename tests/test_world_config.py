"""Config validation: bad values fail at construction with the field name and the allowed range."""

import pytest

from gpr_sim.world import RewardConfig, WorldConfig, preset


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_ads", 0, r"num_ads=0 is out of range: expected a number in \[1"),
        ("num_ads", 2.5, r"num_ads=2.5 must be an integer"),
        ("fatigue_decay", 1.5, r"fatigue_decay=1.5 is out of range: expected a number in \[0.0, 1.0\]"),
        ("target_cpa_mean", 0.0, r"target_cpa_mean=0.0 is out of range: expected a number in \(0.0"),
        ("reserve_ecpm", -1.0, r"reserve_ecpm=-1.0 is out of range"),
        ("num_slots", 3, r"num_slots=3 is out of range: expected at most num_candidates=1"),
        ("activity_weights", (1.0, 2.0), r"activity_weights"),
        ("ctr_bias", float("nan"), r"ctr_bias=nan is out of range"),
    ],
)
def test_invalid_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig.small(**{field: value})


def test_reward_weights_validated_and_round_trip():
    with pytest.raises(ValueError, match="reward.gmv"):
        RewardConfig(gmv=float("inf"))
    cfg = WorldConfig.small(num_ads=123, reward=RewardConfig(stay=0.5))
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown WorldConfig field"):
        WorldConfig.from_dict({"num_adz": 3})


def test_presets():
    assert preset("large").num_ads >= 1_000_000
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        preset("huge")
