"""gpr_sim.stats: every interval by hand, against scipy's own tests, by simulated coverage, and its errors."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from gpr_sim.stats import (
    CI_SUFFIXES,
    CIConfig,
    Estimate,
    bootstrap_ratio,
    bootstrap_sums,
    critical_value,
    mean_interval,
    paired_difference,
    percentile_interval,
    ratio_of_means,
    relative_change,
    t_interval,
    welch_df,
    welch_interval,
)

Z95 = 1.959964  # two-sided 95% normal quantile
T975_DF2 = 4.302653  # two-sided 95% Student t quantile, 2 degrees of freedom (three seeds)


# ----------------------------------------------------------------------------- quantiles


def test_critical_values_match_printed_tables():
    assert critical_value(0.95) == pytest.approx(Z95, abs=1e-6)
    assert critical_value(0.90) == pytest.approx(1.644854, abs=1e-6)
    # Student t, two-sided 95%: df 1, 2, 10, 30 (any printed t table)
    for df, want in ((1, 12.706205), (2, T975_DF2), (10, 2.228139), (30, 2.042272)):
        assert critical_value(0.95, df) == pytest.approx(want, abs=1e-6)
    assert critical_value(0.90, 30) == pytest.approx(1.697261, abs=1e-6)
    # t tends to the normal: df = inf is the normal quantile, a large df is within 0.01% of it
    assert critical_value(0.95, math.inf) == critical_value(0.95)
    assert critical_value(0.95, 1e6) == pytest.approx(Z95, rel=1e-4)
    # the reason seed bands use t: with three seeds the 95% t interval is 2.195x the 1.96 one
    assert critical_value(0.95, 2) / critical_value(0.95) == pytest.approx(2.1953, abs=1e-4)


# ----------------------------------------------------------------------------- means and ratios by hand


def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, se = 1 / sqrt(3) = 0.57735, half = t(0.975, 2) se = 4.302653 * 0.57735 = 2.484138
    est = t_interval([1.0, 2.0, 3.0])
    assert est.value == 2.0 and est.n == 3
    assert est.std_err == pytest.approx(1 / math.sqrt(3))
    assert (est.ci_low, est.ci_high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # two values a, b: s = |a - b| / sqrt(2), half = t(0.975, 1) |a - b| / 2 = 12.706205
    assert t_interval([1.0, 3.0]).ci_high == pytest.approx(2.0 + 12.706205, abs=1e-6)
    # one seed: a value, no interval
    one = t_interval([5.0])
    assert one.value == 5.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high) and one.n == 1


def test_mean_interval_by_hand():
    # x = (2, 4, 6, 8): mean 5, s^2 = (9 + 1 + 1 + 9) / 3 = 20/3, se = sqrt(20/3 / 4) = 1.2909944
    est = mean_interval(np.array([2.0, 4.0, 6.0, 8.0]))
    assert est.value == 5.0
    assert est.std_err == pytest.approx(1.2909944)
    assert (est.ci_low, est.ci_high) == pytest.approx((5 - Z95 * 1.2909944, 5 + Z95 * 1.2909944), abs=1e-5)
    # a 90% interval uses z = 1.644854
    assert mean_interval(np.array([2.0, 4.0, 6.0, 8.0]), level=0.9).ci_high == pytest.approx(
        5 + 1.644854 * 1.2909944
    )


def test_ratio_of_means_by_hand():
    # units (num, den) = (1, 10), (3, 10), (2, 20): R = 6 / 40 = 0.15, mean(den) = 40/3
    # influence (num - R den) / mean(den) = (-0.5, 1.5, -1.0) * 3/40; var(ddof=1) of (-0.5, 1.5, -1) = 3.5 / 2 = 1.75
    # Var(R) = 1.75 / (3 * (40/3)^2) = 0.00328125, se = 0.0572822; CI = 0.15 -+ 1.959964 * 0.0572822
    est = ratio_of_means(np.array([1.0, 3.0, 2.0]), np.array([10.0, 10.0, 20.0]))
    assert est.value == pytest.approx(0.15)
    assert est.std_err == pytest.approx(math.sqrt(0.00328125))
    assert est.ci_low == pytest.approx(0.0377290, abs=1e-6)
    assert est.ci_high == pytest.approx(0.2622710, abs=1e-6)
    assert est.n == 3 and est.name == "ratio"
    # with den == 1 the delta method is the CLT interval of the mean
    x = np.array([2.0, 4.0, 6.0, 8.0])
    assert ratio_of_means(x, np.ones(4))[:4] == pytest.approx(tuple(mean_interval(x))[:4])


def test_data_without_an_interval_gives_nan_not_errors():
    one = ratio_of_means(np.array([1.0]), np.array([4.0]))
    assert one.value == 0.25 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert math.isnan(
        ratio_of_means(np.array([0.0, 0.0]), np.array([0.0, 0.0])).value
    )  # no impressions: no CTR
    assert math.isnan(welch_interval([1.0], [2.0, 3.0]).ci_low)
    assert math.isnan(relative_change([1.0], 2.0, 1.5, 2.5).ci_low)
    assert math.isnan(relative_change([1.0, 2.0], 0.0, 0.0, 0.0).value)  # a zero reference: no ratio


# ----------------------------------------------------------------------------- two samples


def test_welch_interval_by_hand_and_against_scipy():
    # x = 1, 2, 3, 4: mean 2.5, s^2 = 5/3, v_x = s^2 / 4 = 0.416667; y = 2, 4, 9: mean 5, s^2 = 13, v_y = 4.333333
    # df = (v_x + v_y)^2 / (v_x^2 / 3 + v_y^2 / 2) = 4.75^2 / (0.057870 + 9.388889) = 22.5625 / 9.446759 = 2.388385
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 9.0]
    assert welch_df(5 / 12, 3, 13 / 3, 2) == pytest.approx(2.388385, abs=1e-6)
    est = welch_interval(x, y)
    # se = sqrt(4.75) = 2.179449; half = t(0.975, 2.388385) se = 3.697 * 2.179449 = 8.0575
    assert est.value == pytest.approx(-2.5) and est.std_err == pytest.approx(math.sqrt(4.75))
    assert est.ci_high - est.value == pytest.approx(8.0575, abs=1e-3)
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert ref.df == pytest.approx(2.388385, abs=1e-6)
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    # the df lies between min(df_x, df_y) and df_x + df_y; no sampling noise: the normal quantile
    assert 2 <= welch_df(5 / 12, 3, 13 / 3, 2) <= 5
    assert welch_df(0.0, 3, 0.0, 2) == math.inf and welch_df(0.0, 3, 1.0) == math.inf


def test_relative_change_by_hand():
    # x = 1.0, 0.7, 1.5 vs reference 0.8 [0.7, 0.9]: R = 1.066667 / 0.8 = 1.333333, r = 0.333333
    # se_ref = 0.2 / (2 * 1.959964) = 0.051021; a = s^2 / (n ref^2) = 0.163333 / (3 * 0.64) = 0.085069
    # b = (R se_ref / ref)^2 = (1.333333 * 0.051021 / 0.8)^2 = 0.007231; se = sqrt(0.092300) = 0.303810
    # df = 2 * (0.092300 / 0.085069)^2 = 2.3546: half = t(0.975, 2.3546) se = 3.7378 * 0.303810 = 1.135586
    est = relative_change([1.0, 0.7, 1.5], 0.8, 0.7, 0.9)
    assert est.value == pytest.approx(1 / 3) and est.std_err == pytest.approx(0.303810, abs=1e-6)
    assert est.ci_high - est.value == pytest.approx(1.135586, abs=1e-5)
    assert est.value - est.ci_low == pytest.approx(1.135586, abs=1e-5)
    # an exact reference (zero-width CI) leaves the t interval of x / ref - 1 over the units
    exact = relative_change([1.0, 0.7, 1.5], 0.8, 0.8, 0.8)
    want = t_interval([v / 0.8 - 1 for v in (1.0, 0.7, 1.5)])
    assert exact[:3] == pytest.approx(tuple(want)[:3])
    # units that agree: only the reference's CI, as a normal interval. x = 1.2 (three times) vs 0.8 [0.7, 0.9]:
    # R = 1.5, se = R se_ref / ref = 1.5 * 0.051021 / 0.8 = 0.095664, half = 1.959964 * se = 0.1875
    agree = relative_change([1.2, 1.2, 1.2], 0.8, 0.7, 0.9)
    assert agree.value == pytest.approx(0.5) and agree.ci_high - 0.5 == pytest.approx(0.1875, abs=1e-6)
    # read as a 90% CI, the same endpoints are more standard errors: se_ref = 0.1 / 1.644854 = 0.060796,
    # half = 1.959964 * 1.5 * 0.0607957 / 0.8 = 0.223420
    assert relative_change([1.2, 1.2], 0.8, 0.7, 0.9, ref_level=0.9).ci_high == pytest.approx(
        0.5 + 0.223420, abs=1e-6
    )
    # units agree closely, the reference does not: df = 2 (b / a + 1)^2 = 1985, half = 1.9612 * 0.081017 = 0.158887
    close = relative_change([1.0, 1.02, 0.98], 0.8, 0.7, 0.9)
    assert close.value == pytest.approx(0.25) and close.ci_high - 0.25 == pytest.approx(0.158887, abs=1e-5)


def test_paired_difference_by_hand():
    # x = 3, 5, 4 and y = 1, 2, 3: d = 2, 3, 1: mean 2, s = 1, half = 4.302653 / sqrt(3) = 2.484138
    est = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
    assert est.value == 2.0 and est.n == 3
    assert est.ci_high == pytest.approx(2 + 2.484138, abs=1e-6) and est.ci_low == pytest.approx(
        2 - 2.484138, abs=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_difference_is_narrower_on_correlated_units(seed):
    # 40 units with a shared unit effect (sd 1) and independent noise (sd 0.1) under each treatment, effect
    # 0.2: Var(x - y) = 2 * 0.01 = 0.02 against Var(x) + Var(y) = 2 * 1.01 = 2.02, so the paired se should be
    # about sqrt(0.02 / 2.02) = 0.10 of the unpaired one; asserted below 0.5 (the sample sds of 40 units
    # are within ~25% of the true ones). The paired interval is 0.2 +- 2.02 * 0.022 (its low end 7 sds
    # above 0); the unpaired one is 0.2 +- 2.02 * 0.22, and its low end reaches 0 only if the unpaired se
    # falls below 0.2 / 2.02 = 0.1, under half its value: 0 of 20,000 simulated seeds did either.
    rng = np.random.default_rng(seed)
    unit = rng.normal(0.0, 1.0, 40)
    x = unit + 0.2 + rng.normal(0.0, 0.1, 40)
    y = unit + rng.normal(0.0, 0.1, 40)
    paired, unpaired = paired_difference(x, y), welch_interval(x, y)
    assert paired.value == pytest.approx(x.mean() - y.mean())  # the same point estimate
    assert paired.std_err < 0.5 * unpaired.std_err
    assert paired.ci_low > 0 > unpaired.ci_low  # the pairing resolves a difference the groups hide


# ----------------------------------------------------------------------------- coverage


def test_t_interval_covers_at_its_level_where_the_normal_one_does_not():
    # 4000 replicates of 3 normal draws: the 95% t interval covers the true mean in ~95% of them (binomial
    # sd sqrt(.95 * .05 / 4000) = 0.0034, so [0.935, 0.965] is over +-4 sd); mean +- 1.96 se covers only
    # P(|T_2| < 1.96) = 0.811.
    rng = np.random.default_rng(1)
    draws = rng.normal(10.0, 2.0, size=(4000, 3))
    t_cover = np.mean([(e := t_interval(d)).ci_low <= 10.0 <= e.ci_high for d in draws])
    z_cover = np.mean(np.abs(draws.mean(1) - 10.0) <= Z95 * draws.std(1, ddof=1) / math.sqrt(3))
    assert 0.935 <= t_cover <= 0.965
    assert z_cover == pytest.approx(2 * sps.t.cdf(Z95, 2) - 1, abs=0.03)  # 0.811


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_sums_are_multinomial_resamples():
    data = np.arange(12, dtype=np.float64).reshape(6, 2)  # (n, C) = (6, 2)
    sums = bootstrap_sums(data, np.random.default_rng(4), 50)
    counts = np.random.default_rng(4).multinomial(6, np.full(6, 1 / 6), size=50)  # (B, n) the same draws
    np.testing.assert_array_equal(sums, counts @ data)
    assert sums.shape == (50, 2)
    np.testing.assert_array_equal(bootstrap_sums(data, np.random.default_rng(4), 50), sums)  # seeded


def test_percentile_interval_by_hand():
    # 101 replicates 0..100: the 5% and 95% quantiles are 5 and 95; NaN and inf replicates are dropped
    reps = np.concatenate([np.arange(101.0), [np.nan, np.inf]])
    est = percentile_interval(reps, 50.0, level=0.9, n=10, name="x")
    assert (est.value, est.ci_low, est.ci_high) == pytest.approx((50.0, 5.0, 95.0)) and (est.n, est.name) == (
        10,
        "x",
    )
    assert est.std_err == pytest.approx(np.arange(101.0).std(ddof=1))
    assert math.isnan(percentile_interval(reps, 50.0, n=1).ci_low)  # one unit: no interval
    assert math.isnan(percentile_interval([1.0, np.nan], 1.0, n=5).ci_low)  # one finite replicate


def test_bootstrap_covers_the_mean_and_matches_the_normal_interval():
    # 2000 skewed (exponential) values, 2000 resamples. Monte Carlo sd of a 2.5% percentile endpoint:
    # sqrt(.025 * .975 / 2000) / phi(1.96) = 0.06 se; skew of the mean 2 / sqrt(2000) moves the endpoints
    # by ~0.02 se. Tolerance: 10% of the normal interval's width (0.39 se), over 5 of those sds.
    x = np.random.default_rng(2).exponential(1.0, 2000)
    boot = bootstrap_ratio(x, rng=np.random.default_rng(3), n_bootstrap=2000)
    normal = mean_interval(x)
    assert boot.value == pytest.approx(x.mean()) and boot.ci_low < x.mean() < boot.ci_high
    width = normal.ci_high - normal.ci_low
    assert abs(boot.ci_low - normal.ci_low) < 0.1 * width and abs(boot.ci_high - normal.ci_high) < 0.1 * width
    assert boot.std_err == pytest.approx(normal.std_err, rel=0.1)  # sd of a std from 2000 draws: ~1.6%
    # a ratio of sums: the bootstrap and the delta method agree the same way
    den = 1 + np.random.default_rng(5).poisson(4.0, 2000).astype(float)
    num = np.random.default_rng(6).binomial(den.astype(int), 0.1).astype(float)
    b, d = bootstrap_ratio(num, den, rng=np.random.default_rng(7), n_bootstrap=2000), ratio_of_means(num, den)
    assert b.value == d.value and abs(b.ci_high - d.ci_high) < 0.1 * (d.ci_high - d.ci_low)


# ----------------------------------------------------------------------------- result type and errors


def test_estimate_columns_name_the_flat_table_keys():
    e = Estimate(1.0, 0.5, 1.5, 0.25, 4, "ctr")
    assert e.columns("eval/ctr") == {"eval/ctr": 1.0, "eval/ctr_ci_low": 0.5, "eval/ctr_ci_high": 1.5}
    assert list(e.columns("m")) == [f"m{s}" for s in CI_SUFFIXES]
    assert math.isnan(Estimate(1.0, 0.5, 1.5).std_err)


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, -0.1, math.nan, True, "0.95"])
def test_bad_levels_raise(level):
    with pytest.raises(ValueError, match="level must be in"):
        t_interval([1.0, 2.0], level)
    with pytest.raises(ValueError, match="level must be in"):
        critical_value(level)
    with pytest.raises(ValueError, match="level must be in"):
        CIConfig(level=level)


def test_bad_samples_raise():
    sample_fns = (
        t_interval,
        mean_interval,
        lambda x: paired_difference(x, x),
        lambda x: welch_interval(x, x),
        lambda x: relative_change(x, 1.0, 0.9, 1.1),
        lambda x: ratio_of_means(x, np.ones(len(x))),
        lambda x: bootstrap_ratio(x, rng=np.random.default_rng(0)),
    )
    for fn in sample_fns:
        with pytest.raises(ValueError, match="empty"):
            fn(np.array([]))
        with pytest.raises(ValueError, match="NaN"):
            fn(np.array([1.0, np.nan, 2.0]))
        with pytest.raises(ValueError, match="NaN"):
            fn(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="1-d"):
        t_interval(np.ones((2, 2)))
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="shapes"):
        ratio_of_means(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="reference must be finite"):
        relative_change([1.0, 2.0], math.nan, 0.0, 1.0)
    with pytest.raises(ValueError, match="nan_policy"):
        t_interval([1.0, 2.0], nan_policy="omit")
    with pytest.raises(ValueError, match="df must be"):
        critical_value(0.95, 0)
    with pytest.raises(ValueError, match="df must be"):
        critical_value(0.95, math.nan)
    with pytest.raises(ValueError, match="rng"):
        bootstrap_sums(np.ones((3, 1)), np.random.RandomState(0))
    with pytest.raises(ValueError, match="n_bootstrap"):
        bootstrap_sums(np.ones((3, 1)), np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="n_bootstrap"):
        CIConfig(n_bootstrap=1)
    with pytest.raises(ValueError, match="CIConfig.method"):
        CIConfig(method="exact")


def test_propagate_gives_nan_intervals_for_tables():
    # a table cell where one seed's value is missing is unknown, not an error
    est = t_interval([1.0, np.nan, 2.0], nan_policy="propagate")
    assert math.isnan(est.value) and math.isnan(est.ci_low) and est.n == 3
    assert math.isnan(paired_difference([1.0, 2.0], [np.nan, 1.0], nan_policy="propagate").ci_high)
    missing_ref = relative_change([1.0, 2.0], math.nan, math.nan, math.nan, nan_policy="propagate")
    assert math.isnan(missing_ref.value) and math.isnan(missing_ref.ci_low)
    no_ref_ci = relative_change([1.0, 2.0], 1.0, math.nan, math.nan, nan_policy="propagate")
    assert no_ref_ci.value == pytest.approx(0.5) and math.isnan(no_ref_ci.ci_low)
