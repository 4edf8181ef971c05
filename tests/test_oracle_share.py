"""agents.evaluation.oracle_share: hand-checkable shares (oracle = 1, a fixed ad, uniform random), the
interval, determinism, the warm-up and the config checks."""

import pytest
import torch
from torch.testing import assert_close

from agents.evaluation.heldout import HeldOutConfig
from agents.evaluation.oracle_share import (
    OracleShareConfig,
    RequestStates,
    best_true_values,
    oracle_share,
    policy_values,
    state_values,
    summarize_shares,
    true_values,
)
from agents.policies import PolicyOutput, catalog_rows, make_policy
from envs import make_vec_env

torch.set_num_threads(1)
TINY_WORLD = dict(num_ads=6, num_advertisers=3)  # few ads: every value below can be listed by hand


class FixedAds:
    """Serves ``ads[i % len(ads)]`` on its i-th call (a policy without an exact action distribution)."""

    def __init__(self, n: int, ads: list[int]):
        self.n, self.ads, self.calls = n, ads, 0

    def act(self, obs) -> PolicyOutput:
        ad = self.ads[self.calls % len(self.ads)]
        self.calls += 1
        return PolicyOutput(torch.full((self.n, 1), ad), torch.ones(self.n, dtype=torch.float64))


def tiny_states(n: int = 16, **changes) -> RequestStates:
    env = make_vec_env("ads-v0", n, validate_actions=False, **TINY_WORLD)
    return RequestStates.from_env(env, OracleShareConfig(states=n, **changes))


def ad_values(states: RequestStates) -> torch.Tensor:
    """(N, num_ads) true value of each ad scored on its own (one candidate per call), 0 when ineligible:
    the reference the library's batched table is checked against."""
    vec = states.env.unwrapped
    n, num_ads = vec.num_envs, vec.config.num_ads
    eligible = vec.eligible_ads()
    cols = [vec.score(torch.full((n, 1), a), truth=True).value[:, 0].double() for a in range(num_ads)]
    return torch.stack(cols, 1) * eligible[None]


@pytest.fixture(scope="module")
def small():
    return RequestStates.build(OracleShareConfig(states=64))


def test_oracle_share_of_the_oracle_is_exactly_one(small):
    out = oracle_share(make_policy("oracle", small.env, 0), small)
    assert out["oracle_share"] == 1.0
    assert out["oracle_share_ci_low"] == out["oracle_share_ci_high"] == 1.0  # every state: value = oracle's
    torch.testing.assert_close(policy_values(make_policy("oracle", small.env, 0), small), small.oracle_values)
    assert out["oracle_states"] == 64 and out["oracle_value"] > 0
    # the fatigue-aware oracle trades some immediate value for longer sessions: below the myopic one
    assert 0.5 < out["oracle_fatigue_share"] < 1.0


def test_fixed_ad_share_by_hand():
    states = tiny_states()
    v = ad_values(states)  # (16, 6)
    # the batched table is the scoring API's, ad by ad (float32 scores: their rounding apart), kept in the
    # scoring's float32: a float64 copy would double its memory for no extra digit
    assert states.values.dtype == torch.float32
    torch.testing.assert_close(states.values.double(), v, rtol=1e-5, atol=1e-8)
    # serving ad 2 everywhere: its value per state over the best eligible ad's value per state
    expected = v[:, 2].sum() / v.max(1).values.sum()
    out = oracle_share(FixedAds(16, [2]), states)
    assert out["oracle_share"] == pytest.approx(float(expected), rel=1e-6)
    assert out["policy_value"] == pytest.approx(float(v[:, 2].mean()), rel=1e-6)
    # a policy without an exact distribution is averaged over ``samples`` calls: ads 0 and 3 alternately
    states2 = tiny_states(samples=2)
    out2 = oracle_share(FixedAds(16, [0, 3]), states2)
    expected2 = (v[:, 0] + v[:, 3]).sum() / 2 / v.max(1).values.sum()
    assert out2["oracle_share"] == pytest.approx(float(expected2), rel=1e-6)


def test_uniform_random_share_is_mean_over_max():
    states = tiny_states()
    vec = states.env.unwrapped
    assert bool(vec.eligible_ads().all())  # at reset every advertiser can bid: mean over eligible = over all
    v = states.values.double()  # the library sums in float64
    # uniform over the 6 ads (its exact action distribution): expected value = the mean of the row
    expected = v.mean(1).sum() / v.max(1).values.sum()
    out = oracle_share(make_policy("random", states.env, 0), states)
    assert out["oracle_share"] == pytest.approx(float(expected), rel=1e-12)
    assert out["oracle_share"] < 1.0


def test_interval_covers_the_point_and_shrinks():
    widths = []
    for n in (64, 1024):
        states = RequestStates.build(OracleShareConfig(states=n))
        out = oracle_share(make_policy("cascade-privileged", states.env, 0), states)
        assert out["oracle_share_ci_low"] < out["oracle_share"] < out["oracle_share_ci_high"]
        widths.append(out["oracle_share_ci_high"] - out["oracle_share_ci_low"])
    # width ~ 1 / sqrt(states): 16x the states, about a quarter of the width (half allows for the sample)
    assert widths[1] < 0.5 * widths[0]


def test_same_seed_same_numbers_other_seed_other_states():
    def run(seed):
        states = RequestStates.build(OracleShareConfig(states=32, seed=seed))
        return oracle_share(make_policy("cascade-privileged", states.env, 0), states)

    assert run(3) == run(3)
    assert run(3)["oracle_value"] != run(4)["oracle_value"]


def test_warmup_moves_the_states_and_keeps_the_oracle_at_one():
    start = tiny_states()
    warm = tiny_states(warmup=3)
    assert not torch.equal(start.values, warm.values)  # fatigue, interests, ad load have moved
    assert oracle_share(make_policy("oracle", warm.env, 0), warm)["oracle_share"] == 1.0


def test_summarize_shares_reads_a_table_back(small):
    values = state_values(make_policy("cascade-privileged", small.env, 0), small)
    as_lists = {k: v.tolist() for k, v in values.items()}
    assert summarize_shares(as_lists, 0.95) == summarize_shares(values, 0.95)
    narrow = summarize_shares(values, 0.5)
    wide = summarize_shares(values, 0.99)
    assert wide["oracle_share_ci_low"] < narrow["oracle_share_ci_low"] < narrow["oracle_share"]


@pytest.mark.parametrize(
    "bad",
    [
        dict(states=0),
        dict(warmup=-1),
        dict(samples=0),
        dict(seed=1.5),
        dict(level=1.0),
        dict(level=float("nan")),
    ],
)
def test_config_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        OracleShareConfig(**bad)


def test_held_out_config_maps_onto_the_states():
    c = HeldOutConfig(preset="small", seed=7, oracle_states=48)
    assert c.oracle_share == OracleShareConfig(states=48, seed=7)
    with pytest.raises(ValueError, match="oracle_states"):
        HeldOutConfig(oracle_states=0)


def test_catalog_chunks_bound_pairs_and_keep_values():
    """Scoring against the whole catalog in chunks of at most ``cells`` (request, ad) pairs gives the same
    table as the one-ad-at-a-time reference, and the chunked best value is that table's eligible max."""
    assert catalog_rows(2048, 500) == 2048  # the small preset: the row cap binds
    assert catalog_rows(2048, 1_000_000) == 4  # the large preset: the pair budget binds
    assert catalog_rows(2048, 10**9, cells=10) == 1  # never zero rows
    states = tiny_states(16)
    vec = states.env.unwrapped
    want = ad_values(states)
    one_chunk = true_values(vec)
    assert_close(
        one_chunk.double(), want, rtol=1e-5, atol=1e-8
    )  # float32 scores: chunk shapes move the rounding
    best_want = one_chunk.masked_fill(~vec.eligible_ads()[None], float("-inf")).max(1).values.double()
    for cells in (6, 7 * 6, 1 << 22):  # one row per chunk, a ragged last chunk, one chunk
        assert_close(true_values(vec, cells=cells), one_chunk, rtol=1e-5, atol=1e-8)
        assert_close(best_true_values(vec, cells=cells), best_want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["random", "cascade-privileged"])
def test_exact_policy_values_read_in_chunks_equal_one_chunk(small, name):
    """An exact distribution read in chunks of (state, ad) pairs (the random policy's covers the whole
    catalog: 2,048 states x 1M ads asked an H200 for 16 GiB per copy) values every state as one chunk does."""
    policy = make_policy(name, small.env, 0)
    whole = policy_values(policy, small)
    for cells in (1, 7 * small.values.shape[1]):  # one state per chunk, a ragged last chunk
        assert_close(policy_values(policy, small, cells=cells), whole, rtol=0, atol=0)
