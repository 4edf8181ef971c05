"""Business metrics over sessions: hand-worked intervals, delta-method coverage, the streaming accumulator."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gpr_sim.metrics import (
    AD_METRICS,
    METRICS,
    SESSION_COLUMNS,
    SUM_COLUMNS,
    Metric,
    SessionAccumulator,
    bootstrap_ci,
    estimate,
    summarize,
    summarize_strata,
)
from gpr_sim.stats import ratio_of_means

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- intervals by hand


def test_empty_groups_give_nan_and_bad_levels_raise():
    # an empty stratum (no sessions) has no value, in both interval methods; a bad level is an error
    empty = {"clicks": np.array([]), "impressions": np.array([])}
    ctr = [Metric("ctr", "clicks", "impressions"), Metric("clicks_per_session", "clicks")]
    for kw in ({}, {"ci": "bootstrap", "rng": np.random.default_rng(0)}):
        est = estimate(empty, ctr, **kw)
        assert all(math.isnan(e.value) and math.isnan(e.ci_low) and e.n == 0 for e in est.values())
    with pytest.raises(ValueError, match="level"):
        estimate({"clicks": np.array([1.0, 2.0]), "impressions": np.array([1.0, 2.0])}, ctr, level=1.5)
    with pytest.raises(ValueError, match="scale"):
        Metric("ctr", "clicks", "impressions", scale=0.0)


def _three_sessions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "length": [2, 3, 1],
            "impressions": [4, 6, 0],
            "clicks": [1, 3, 0],
            "conversions": [1, 0, 0],
            "gmv": [100.0, 0.0, 0.0],
            "revenue": [0.2, 0.3, 0.0],
            "reward": [3.0, 0.5, 0.0],
            "terminated": [True, False, True],
            "expected_clicks": [1.2, 2.7, 0.0],
            "expected_conversions": [0.3, 0.4, 0.0],
            "expected_gmv": [30.0, 20.0, 0.0],
        }
    )


def test_summarize_by_hand():
    # totals: length 6, impressions 10, clicks 4, conversions 1, gmv 100, revenue 0.5, reward 3.5
    s = summarize(_three_sessions(), prefix="sim/")
    assert s["sim/sessions"] == 3
    assert s["sim/ctr"] == pytest.approx(4 / 10)
    assert s["sim/cvr"] == pytest.approx(1 / 4)
    assert s["sim/ctcvr"] == pytest.approx(1 / 10)
    assert s["sim/ecpm"] == pytest.approx(1000 * 0.5 / 10)  # 50 currency per 1000 impressions
    assert s["sim/roi"] == pytest.approx(100 / 0.5)  # 200
    assert s["sim/gmv_per_session"] == pytest.approx(100 / 3)
    assert s["sim/revenue_per_session"] == pytest.approx(0.5 / 3)
    assert s["sim/reward_per_session"] == pytest.approx(3.5 / 3)
    assert s["sim/session_length"] == pytest.approx(2.0)
    assert s["sim/fill_rate"] == pytest.approx(10 / 6)
    assert s["sim/exit_rate"] == pytest.approx(2 / 3)
    # expected outcomes: the same ratios of the expected sums (clicks 3.9, conversions 0.7, GMV 50)
    assert s["sim/ctr_expected"] == pytest.approx(3.9 / 10)
    assert s["sim/cvr_expected"] == pytest.approx(0.7 / 3.9)
    assert s["sim/ctcvr_expected"] == pytest.approx(0.7 / 10)
    assert s["sim/roi_expected"] == pytest.approx(50 / 0.5)
    assert s["sim/gmv_per_session_expected"] == pytest.approx(50 / 3)
    assert s["sim/conversions_per_session_expected"] == pytest.approx(0.7 / 3)
    # CTR interval: influence numerators clicks - 0.4 impressions = (-0.6, 0.6, 0); var(ddof=1) = 0.72 / 2 = 0.36
    # Var = 0.36 / (3 * (10/3)^2) = 0.0108, se = 0.1039230; CI = 0.4 -+ 1.96 * 0.1039230 = [0.196314, 0.603686]
    assert (s["sim/ctr_ci_low"], s["sim/ctr_ci_high"]) == pytest.approx((0.196314, 0.603686), abs=1e-5)
    # scaled metrics scale their interval: eCPM = 1000 x the revenue / impressions ratio
    rev = ratio_of_means(np.array([0.2, 0.3, 0.0]), np.array([4.0, 6.0, 0.0]))
    assert s["sim/ecpm_ci_high"] == pytest.approx(1000 * rev.ci_high)
    assert set(s) == {"sim/sessions"} | {
        f"sim/{m.name}{x}" for m in METRICS for x in ("", "_ci_low", "_ci_high")
    }


def test_summarize_strata_splits_tiers_and_ad_ages():
    df = _three_sessions().assign(
        activity_tier=[1, 1, 5],
        new_impressions=[1, 0, 0],
        new_clicks=[1, 0, 0],
        new_conversions=[1, 0, 0],
        new_gmv=[100.0, 0, 0],
        new_revenue=[0.05, 0.0, 0.0],
        old_impressions=[3, 6, 0],
        old_clicks=[0, 3, 0],
        old_conversions=[0, 0, 0],
        old_gmv=[0.0, 0, 0],
        old_revenue=[0.15, 0.3, 0.0],
    )
    st = summarize_strata(df, prefix="").set_index(["stratum", "group"])
    assert st.loc[("activity_tier", "1"), "sessions"] == 2
    assert st.loc[("activity_tier", "1"), "ctr"] == pytest.approx(4 / 10)
    assert st.loc[("activity_tier", "5"), "session_length"] == 1.0
    assert st.loc[("activity_tier", "3"), "sessions"] == 0 and math.isnan(
        st.loc[("activity_tier", "3"), "ctr"]
    )
    # new ads: 1 impression, 1 click, 1 conversion over all 3 sessions; old ads: 9 impressions, 3 clicks
    assert st.loc[("ad_age", "new"), "sessions"] == 3
    assert st.loc[("ad_age", "new"), "ctr"] == 1.0
    assert st.loc[("ad_age", "old"), "ctr"] == pytest.approx(3 / 9)
    assert st.loc[("ad_age", "old"), "ecpm"] == pytest.approx(1000 * 0.45 / 9)
    assert math.isnan(st.loc[("ad_age", "new"), "session_length"])  # not an ad-group metric
    assert {m.name for m in AD_METRICS} == {
        "ctr",
        "cvr",
        "ctcvr",
        "ecpm",
        "roi",
        "gmv_per_session",
        "revenue_per_session",
        "impressions_per_session",
        "clicks_per_session",
        "conversions_per_session",
    }


# ----------------------------------------------------------------------------- statistical checks


def _synthetic_sessions(rng: np.random.Generator, reps: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(reps, n) clicks and impressions: impressions 1 + Poisson(4); CTR 10% in long sessions, 3% in short."""
    imp = 1 + rng.poisson(4.0, size=(reps, n))
    clicks = rng.binomial(imp, np.where(imp >= 5, 0.10, 0.03))
    return clicks.astype(float), imp.astype(float)


def _true_ctr() -> float:
    # E[clicks] / E[impressions] with impressions = 1 + k, k ~ Poisson(4): E[impressions] = 5
    pmf = [math.exp(-4.0) * 4.0**k / math.factorial(k) for k in range(80)]
    return sum(p * (1 + k) * (0.10 if 1 + k >= 5 else 0.03) for k, p in enumerate(pmf)) / 5.0


def test_delta_method_interval_covers_the_true_ratio():
    # 1000 replicates of 200 sessions; a 95% interval should cover the true CTR in ~950 of them.
    # Binomial sd of the coverage is sqrt(.95 * .05 / 1000) = 0.0069: within 4 sds, [0.922, 0.978]
    # (measured 0.939-0.948 on seeds 0, 1, 2, 7: the delta method at n = 200 covers a little under 95%).
    rng = np.random.default_rng(7)
    clicks, imp = _synthetic_sessions(rng, 1000, 200)
    truth = _true_ctr()  # 0.0782...
    covered = [(e := ratio_of_means(c, i)).ci_low <= truth <= e.ci_high for c, i in zip(clicks, imp)]
    assert abs(np.mean(covered) - 0.95) < 4 * math.sqrt(0.95 * 0.05 / 1000), np.mean(covered)


def test_bootstrap_agrees_with_delta_method_and_is_seeded():
    clicks, imp = _synthetic_sessions(np.random.default_rng(3), 1, 2000)
    cols = {"clicks": clicks[0], "impressions": imp[0]}
    ctr = [Metric("ctr", "clicks", "impressions")]
    boot = bootstrap_ci(cols, ctr, np.random.default_rng(0), n_bootstrap=2000)["ctr"]
    delta = ratio_of_means(cols["clicks"], cols["impressions"])
    assert boot.value == delta.value  # the point estimate is the plug-in ratio either way
    # with 2000 sessions the percentile interval is close to the normal one. Monte Carlo sd of a 2.5%
    # percentile endpoint from 2000 resamples: sqrt(.025 * .975 / 2000) / phi(1.96) = 0.06 se; the ratio's
    # skew at n = 2000 moves the endpoints by a few hundredths of an se. Tolerance: 10% of the normal width
    # (0.39 se), over 6 of those Monte Carlo sds.
    width = delta.ci_high - delta.ci_low
    assert abs(boot.ci_low - delta.ci_low) < 0.1 * width and abs(boot.ci_high - delta.ci_high) < 0.1 * width
    again = bootstrap_ci(cols, ctr, np.random.default_rng(0), n_bootstrap=2000)["ctr"]
    assert again == boot
    with pytest.raises(ValueError, match="rng"):
        estimate(cols, ctr, ci="bootstrap")
    with pytest.raises(ValueError, match="rng"):
        bootstrap_ci(cols, ctr, rng=np.random.RandomState(0))


def test_bootstrap_is_the_percentile_of_shared_multinomial_resamples():
    # reference: 300 resamples of the 3 sessions as multinomial counts, every metric on the same ones
    cols = _three_sessions()
    metrics = [
        Metric("ctr", "clicks", "impressions"),
        Metric("ecpm", "revenue", "impressions", 1000.0),
        Metric("reward_per_session", "reward"),
    ]
    got = bootstrap_ci(cols, metrics, np.random.default_rng(9), level=0.9, n_bootstrap=300)
    counts = np.random.default_rng(9).multinomial(3, np.full(3, 1 / 3), size=300)  # (B, n)
    data = cols[["clicks", "impressions", "revenue", "reward"]].to_numpy(float)  # sorted column names
    sums = counts @ data  # (B, 4)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = {
            "ctr": sums[:, 0] / sums[:, 1],
            "ecpm": 1000 * sums[:, 2] / sums[:, 1],
            "reward_per_session": sums[:, 3] / 3,
        }
    for name, r in reps.items():
        r = r[np.isfinite(r)]  # resamples of only the third session have no impressions
        assert (got[name].ci_low, got[name].ci_high) == pytest.approx(
            tuple(np.quantile(r, [0.05, 0.95])), rel=1e-12
        )
        assert got[name].std_err == pytest.approx(r.std(ddof=1), rel=1e-12) and got[name].n == 3


# ----------------------------------------------------------------------------- the accumulator by hand


def _step(imp, click, conv, gmv, rev, new, reward, user, delayed_conv=(0, 0), delayed_gmv=(0.0, 0.0)):
    """One step of N = 2 env slots with S = 2 ad slots, as the vector env's info dict."""
    b = lambda x: torch.tensor(x, dtype=torch.bool)  # noqa: E731
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return {
        "impression": b(imp),
        "click": b(click),
        "conversion": b(conv),
        "gmv": f(gmv),
        "revenue": f(rev),
        "is_new_ad": b(new),
        "reward": f(reward),
        "delayed_conversion": torch.tensor(delayed_conv),
        "delayed_gmv": f(delayed_gmv),
        "invalid": torch.zeros(2, dtype=torch.int64),
        "budget_capped": torch.zeros(2, dtype=torch.int64),
        "user_id": torch.tensor(user),
        # the true funnel of every shown ad (ad 1): P(click) 0.5, P(conversion | click) 0.5; -1 where none shown
        "ad_id": torch.where(b(imp), 1, -1),
        "p_click": 0.5 * b(imp).float(),
        "p_conversion": 0.5 * b(imp).float(),
    }


F, T = False, True
ACTIVITY = torch.tensor([1, 1, 1, 2, 3, 1, 1, 5, 1, 1])  # users 3 -> tier 2, 4 -> 3, 7 -> 5, 9 -> 1
VALUE = torch.tensor([10.0, 40.0])  # mean order value of ads 0 and 1
SCRIPT = [  # (info, terminated, truncated)
    # slot 0 (user 3): two impressions, the new ad is clicked and converts (GMV 50); slot 1 (user 7) leaves
    (
        _step(
            [[T, T], [T, F]],
            [[T, F], [F, F]],
            [[T, F], [F, F]],
            [[50, 0], [0, 0]],
            [[0.04, 0.03], [0.02, 0]],
            [[T, F], [F, F]],
            [1.0, 0.5],
            [3, 7],
        ),
        [F, T],
        [F, F],
    ),
    # slot 0: an old ad clicked, an earlier conversion reported late (GMV 20), truncated; slot 1 (user 9) leaves
    (
        _step(
            [[T, F], [F, F]],
            [[T, F], [F, F]],
            [[F, F], [F, F]],
            [[0, 0], [0, 0]],
            [[0.05, 0], [0, 0]],
            [[F, F], [F, F]],
            [2.0, 0.0],
            [3, 9],
            delayed_conv=(1, 0),
            delayed_gmv=(20.0, 0.0),
        ),
        [F, T],
        [T, F],
    ),
    # slot 0 (user 4): two new ads, one click, leaves; slot 1's third session is beyond capacity (k = 2)
    (
        _step(
            [[T, T], [T, F]],
            [[F, T], [T, F]],
            [[F, F], [F, F]],
            [[0, 0], [0, 0]],
            [[0.01, 0.01], [0.02, 0]],
            [[T, T], [F, F]],
            [0.2, 0.1],
            [4, 2],
        ),
        [T, T],
        [F, F],
    ),
]


def test_accumulator_by_hand():
    acc = SessionAccumulator(2, ACTIVITY, sessions_per_slot=2, ad_value_mean=VALUE)
    for i, (info, term, trunc) in enumerate(SCRIPT):
        assert not bool(acc.complete())
        acc.update(info, torch.tensor(term), torch.tensor(trunc))
        assert int(acc.num_sessions()) == [1, 3, 4][i]
    assert bool(acc.complete())
    df = acc.records()
    assert list(df.columns) == list(SESSION_COLUMNS)
    assert list(zip(df.slot, df.session)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = df.iloc[0]  # slot 0, steps 1-2, user 3
    assert (first.user_id, first.activity_tier, first.length, first.terminated) == (3, 2, 2, False)
    # impressions 2 + 1 = 3; clicks 1 + 1 = 2; conversions 1 at once + 1 delayed = 2; GMV 50 + 20 = 70
    assert (first.impressions, first.clicks, first.conversions, first.delayed_conversions) == (3, 2, 2, 1)
    assert first.gmv == pytest.approx(70.0) and first.delayed_gmv == pytest.approx(20.0)
    assert first.revenue == pytest.approx(0.04 + 0.03 + 0.05) and first.reward == pytest.approx(3.0)
    # new ad: 1 impression, its click and conversion (GMV 50, price 0.04); the delayed one is in no group
    assert (first.new_impressions, first.new_clicks, first.new_conversions) == (1, 1, 1)
    assert (first.old_impressions, first.old_clicks, first.old_conversions) == (2, 1, 0)
    assert (first.new_gmv, first.old_gmv) == pytest.approx((50.0, 0.0))
    assert (first.new_revenue, first.old_revenue) == pytest.approx((0.04, 0.08))
    # expected outcomes of its 3 impressions of ad 1: 3 x 0.5 clicks, 3 x 0.25 conversions, each worth 40
    assert (first.expected_clicks, first.expected_conversions, first.expected_gmv) == pytest.approx(
        (1.5, 0.75, 30.0)
    )
    second = df.iloc[1]  # slot 0, step 3, user 4
    assert (second.user_id, second.activity_tier, second.length, second.terminated) == (4, 3, 1, True)
    assert (second.impressions, second.clicks, second.new_impressions, second.new_clicks) == (2, 1, 2, 1)
    other = df.iloc[2:]  # slot 1: user 7 (1 impression, price 0.02) then user 9 (nothing shown)
    assert list(other.user_id) == [7, 9] and list(other.activity_tier) == [5, 1]
    assert list(other.impressions) == [1, 0] and list(other.length) == [1, 1]
    assert other.revenue.to_numpy() == pytest.approx([0.02, 0.0])
    assert other.terminated.all()


def test_accumulator_created_mid_run_skips_sessions_already_under_way():
    acc = SessionAccumulator(2, ACTIVITY, sessions_per_slot=2, fresh=False, ad_value_mean=VALUE)
    for info, term, trunc in SCRIPT:
        acc.update(info, torch.tensor(term), torch.tensor(trunc))
    df = acc.records()
    # slot 0's session of steps 1-2 and slot 1's session of step 1 began before; the rest are recorded
    assert list(zip(df.slot, df.session, df.user_id)) == [(0, 0, 4), (1, 0, 9), (1, 1, 2)]
    assert not bool(acc.complete())
    with pytest.raises(ValueError, match="sessions_per_slot"):
        SessionAccumulator(2, ACTIVITY, sessions_per_slot=0, ad_value_mean=VALUE)


def test_accumulator_matches_the_env_on_a_real_run():
    """Session lengths and returns equal the env's own episode statistics; nothing is lost or counted twice."""
    from agents.policies import make_policy
    from envs import AdsVectorEnv

    env = AdsVectorEnv(num_envs=16, preset="small", validate_actions=False)
    policy = make_policy("random", env, seed=1)
    obs, _ = env.reset(seed=5)
    world = env.engine.world
    acc = SessionAccumulator(
        16, world.user_activity, sessions_per_slot=1000, ad_value_mean=world.ad_value_mean
    )
    finished, impressions, conversions = [], 0.0, 0.0
    for _ in range(40):
        obs, _, term, trunc, info = env.step(policy.act(obs).action)
        acc.update(info, term, trunc)
        impressions += float(info["impression"].sum())
        conversions += float(info["conversion"].sum() + info["delayed_conversion"].sum())
        done = torch.nonzero(term | trunc).squeeze(1)
        finished += [(int(s), int(info["episode_length"][s]), float(info["episode_return"][s])) for s in done]
    df = acc.records()
    finished.sort(key=lambda r: r[0])  # stable: per slot in time order, like the records
    assert list(df.slot) == [r[0] for r in finished]
    assert list(df.length) == [r[1] for r in finished]
    assert df.reward.to_numpy() == pytest.approx([r[2] for r in finished], rel=1e-6)
    # every impression is in a finished session or in a session still running
    running = dict(zip(SUM_COLUMNS, acc.running.sum(0).tolist()))
    assert df.impressions.sum() + running["impressions"] == impressions
    assert df.conversions.sum() + running["conversions"] == conversions
    assert (df.new_impressions + df.old_impressions == df.impressions).all()


@pytest.mark.parametrize(
    "realised, expected",
    [("clicks", "expected_clicks"), ("conversions", "expected_conversions"), ("gmv", "expected_gmv")],
)
def test_expected_outcomes_estimate_the_realised_ones_with_less_noise(realised, expected):
    """Per session, realised minus expected clicks, conversions and GMV is a sum of zero-mean martingale steps
    (each step's expectation given everything before its draw), so its mean over sessions lies within 4 standard
    errors of 0 (a 6e-5 chance of a false alarm, and the run is seeded); and the expected sums give the metric a
    narrower interval than the realised ones."""
    from agents.policies import make_policy
    from envs import AdsVectorEnv

    env = AdsVectorEnv(num_envs=64, preset="small", validate_actions=False)
    world = env.engine.world
    policy = make_policy("cascade-privileged", env, seed=3)
    obs, _ = env.reset(seed=11)
    acc = SessionAccumulator(
        64, world.user_activity, sessions_per_slot=1000, ad_value_mean=world.ad_value_mean
    )
    with torch.no_grad():
        for _ in range(120):
            obs, _, term, trunc, info = env.step(policy.act(obs).action)
            acc.update(info, term, trunc)
    df = acc.records()
    assert len(df) > 500 and df[realised].sum() > 20  # enough sessions and events for the CLT
    gap = df[realised] - df[expected]
    assert abs(gap.mean()) < 4 * gap.std(ddof=1) / math.sqrt(len(df))
    s = summarize(df, prefix="")
    per_session = {"clicks": "ctr", "conversions": "ctcvr", "gmv": "gmv_per_session"}[realised]
    width = s[f"{per_session}_ci_high"] - s[f"{per_session}_ci_low"]
    width_expected = s[f"{per_session}_expected_ci_high"] - s[f"{per_session}_expected_ci_low"]
    assert width_expected < width
