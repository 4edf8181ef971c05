"""Off-policy estimators: hand-worked logs, statistical checks on a synthetic bandit, bad-log errors."""

import numpy as np
import pandas as pd
import pytest

from gpr_sim.data.bandit import LoggedBandit
from gpr_sim.data.ope import (
    direct_method,
    doubly_robust,
    estimate_all,
    independent_ips,
    ips,
    position_breakdown,
    snips,
    weight_stats,
)
from gpr_sim.stats import CIConfig

Z95 = 1.959964  # two-sided 95% normal quantile

# ----------------------------------------------------------------------------- a 4-row log by hand
# action      [0,   1,   0,    1   ]
# reward      [1,   0,   1,    1   ]
# propensity  [0.5, 0.5, 0.25, 0.75]
# pi_e rows   [.8 .2], [.8 .2], [.5 .5], [.5 .5] -> pi_e(a_i) = [0.8, 0.2, 0.5, 0.5]
# w = pi_e / p = [1.6, 0.4, 2.0, 2/3]


@pytest.fixture
def tiny():
    data = LoggedBandit(
        action=np.array([0, 1, 0, 1]),
        reward=np.array([1.0, 0.0, 1.0, 1.0]),
        propensity=np.array([0.5, 0.5, 0.25, 0.75]),
        n_actions=2,
    )
    pi_e = np.array([[0.8, 0.2], [0.8, 0.2], [0.5, 0.5], [0.5, 0.5]])
    q_hat = np.array([[0.9, 0.1], [0.6, 0.3], [0.7, 0.5], [0.2, 0.9]])
    return data, pi_e, q_hat


def test_ips_by_hand(tiny):
    data, pi_e, _ = tiny
    est = ips(data, pi_e)
    # w r = [1.6, 0, 2, 2/3] = [24, 0, 30, 10] / 15; mean = 64/60 = 16/15
    assert est.value == pytest.approx(16 / 15)
    # deviations from the mean (x15): [8, -16, 14, -6]; sum of squares 552/225
    # var (ddof=1) = 552/675; std_err = sqrt(552/675/4) = 0.452155
    assert est.std_err == pytest.approx(np.sqrt(552 / 2700))
    assert est.ci_low == pytest.approx(16 / 15 - Z95 * 0.452155, abs=1e-5)
    assert est.ci_high == pytest.approx(16 / 15 + Z95 * 0.452155, abs=1e-5)
    assert (est.n, est.name) == (4, "ips")
    # pi_e of the logged action alone gives the same answer
    assert ips(data, np.array([0.8, 0.2, 0.5, 0.5])).value == pytest.approx(16 / 15)


def test_clipped_ips_by_hand(tiny):
    data, pi_e, _ = tiny
    est = ips(data, pi_e, clip=1.5)
    # w clipped = [1.5, 0.4, 1.5, 2/3]; w r = [1.5, 0, 1.5, 2/3]; sum 11/3; mean 11/12
    assert est.value == pytest.approx(11 / 12)
    assert est.name == "ips(clip=1.5)"


def test_snips_by_hand(tiny):
    data, pi_e, _ = tiny
    est = snips(data, pi_e)
    # sum(w r) = 64/15, sum(w) = 1.6 + 0.4 + 2 + 2/3 = 70/15  ->  V = 64/70 = 32/35
    assert est.value == pytest.approx(32 / 35)
    # delta method: d_i = w_i (r_i - V) / mean(w), mean(w) = 70/60
    #   d = [1.6 * 3/35, 0.4 * -32/35, 2 * 3/35, 2/3 * 3/35] / (7/6)
    #     = [0.117551, -0.313469, 0.146939, 0.048980]   (sums to 0)
    # var (ddof=1) = (0.013818 + 0.098263 + 0.021591 + 0.002399) / 3 = 0.045357; se = sqrt(0.045357 / 4)
    assert est.std_err == pytest.approx(0.106486, abs=1e-5)


def test_dm_by_hand(tiny):
    data, pi_e, q_hat = tiny
    est = direct_method(data, pi_e, q_hat)
    # per row sum_a pi_e q: .8*.9+.2*.1=.74, .8*.6+.2*.3=.54, .5*.7+.5*.5=.60, .5*.2+.5*.9=.55
    # mean = 2.43 / 4 = 0.6075
    assert est.value == pytest.approx(0.6075)
    # deviations [.1325, -.0675, -.0075, -.0575]; squares .01755625 + .00455625 + .00005625 + .00330625
    # = .025475; se = sqrt(.025475 / 3 / 4) = 0.046075
    assert est.std_err == pytest.approx(np.sqrt(0.025475 / 12))


def test_dr_by_hand(tiny):
    data, pi_e, q_hat = tiny
    # row terms DM_i + w_i (r_i - q(a_i)):
    #   .74 + 1.6 (1 - .9) = .90;  .54 + .4 (0 - .3) = .42
    #   .60 + 2 (1 - .7) = 1.2;    .55 + 2/3 (1 - .9) = .616667
    # mean = 3.136667 / 4 = 0.784167
    assert doubly_robust(data, pi_e, q_hat).value == pytest.approx(3.1366667 / 4)
    # clip 1.5: rows 0 and 2 use w = 1.5: .74 + .15 = .89, .60 + .45 = 1.05
    #   -> (0.89 + .42 + 1.05 + .616667) / 4
    assert doubly_robust(data, pi_e, q_hat, clip=1.5).value == pytest.approx(2.9766667 / 4)
    # a perfect-for-the-log q_hat (q(a_i) = r_i) leaves only the DM part
    q_exact = q_hat.copy()
    q_exact[np.arange(4), data.action] = data.reward
    dm = direct_method(data, pi_e, q_exact).value
    assert doubly_robust(data, pi_e, q_exact).value == pytest.approx(dm)


def test_bootstrap_is_seeded_and_collapses_on_constant_terms(tiny):
    data, pi_e, q_hat = tiny
    a = ips(data, pi_e, ci="bootstrap", n_bootstrap=200, rng=np.random.default_rng(3))
    b = ips(data, pi_e, ci="bootstrap", n_bootstrap=200, rng=np.random.default_rng(3))
    assert a == b
    assert a.value == pytest.approx(16 / 15)  # the point estimate is the full-sample one
    # every w r equals 0.5, so every resample has mean 0.5
    const = LoggedBandit(np.array([0, 0, 0]), np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.5, 0.5]))
    est = ips(
        const, np.array([0.25, 0.25, 0.25]), ci="bootstrap", n_bootstrap=50, rng=np.random.default_rng(0)
    )
    assert (est.value, est.ci_low, est.ci_high) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="rng"):
        ips(data, pi_e, ci="bootstrap")


def test_bootstrap_agrees_with_normal_on_large_log():
    rng = np.random.default_rng(11)
    n = 4000
    data = LoggedBandit(rng.integers(0, 2, n), rng.binomial(1, 0.3, n).astype(float), np.full(n, 0.5))
    pi_e = np.where(data.action == 1, 0.8, 0.2)
    for fn in (ips, snips):
        normal = fn(data, pi_e)
        boot = fn(data, pi_e, ci="bootstrap", n_bootstrap=400, rng=np.random.default_rng(5))
        # the bootstrap std of a smooth statistic matches the CLT/delta-method one: the relative sd of a std
        # from 400 replicates is 1/sqrt(800) = 3.5%, so within 4 of those (14%)
        assert boot.std_err == pytest.approx(normal.std_err, rel=4 / np.sqrt(2 * 400))
        assert boot.ci_low < normal.value < boot.ci_high


# ----------------------------------------------------------------------------- slates by hand
# request  [0,   0,    1,   1  ]
# position [0,   1,    0,   1  ]
# reward   [1,   0,    0,   1  ]
# p        [0.5, 0.25, 0.5, 0.5]
# pi_e     [.25, 0.5,  .75, 1.0]  ->  w = [0.5, 2, 1.5, 2], w r = [0.5, 0, 0, 2]


@pytest.fixture
def slate():
    data = LoggedBandit(
        action=np.array([0, 1, 1, 0]),
        reward=np.array([1.0, 0.0, 0.0, 1.0]),
        propensity=np.array([0.5, 0.25, 0.5, 0.5]),
        position=np.array([0, 1, 0, 1]),
        n_actions=2,
        request_id=np.array([0, 0, 1, 1]),
    )
    return data, np.array([0.25, 0.5, 0.75, 1.0])


def test_independent_ips_by_hand(slate):
    data, pi_e = slate
    with_ids = independent_ips(data, pi_e)
    # per request: 0.5 + 0 = 0.5 and 0 + 2 = 2 -> mean 1.25
    # var(ddof=1) = 1.125 -> se = sqrt(1.125 / 2) = 0.75
    assert (with_ids.value, with_ids.std_err, with_ids.n) == pytest.approx((1.25, 0.75, 2))
    no_ids = independent_ips(LoggedBandit(data.action, data.reward, data.propensity, data.position), pi_e)
    # slot 0: mean(0.5, 0) = 0.25, var/n = 0.125/2;  slot 1: mean(0, 2) = 1, var/n = 2/2
    # value 1.25 (same: every request fills every slot); se = sqrt(0.0625 + 1) = 1.030776
    assert (no_ids.value, no_ids.std_err, no_ids.n) == pytest.approx((1.25, np.sqrt(1.0625), 4))


def test_position_breakdown_by_hand(slate):
    data, pi_e = slate
    df = position_breakdown(data, pi_e)
    assert df["position"].tolist() == [0, 1]
    assert df["n"].tolist() == [2, 2]
    assert df["logged"].tolist() == pytest.approx([0.5, 0.5])
    assert df["value"].tolist() == pytest.approx([0.25, 1.0])
    # mean weight: (0.5 + 1.5) / 2 = 1, (2 + 2) / 2 = 2
    # ess = (sum w)^2 / sum w^2: slot 0 2^2 / (0.25 + 2.25) = 1.6; slot 1 4^2 / (4 + 4) = 2
    assert df["mean_weight"].tolist() == pytest.approx([1.0, 2.0])
    assert df["ess"].tolist() == pytest.approx([1.6, 2.0])
    # the per-slot values sum to the slate value
    assert df["value"].sum() == pytest.approx(independent_ips(data, pi_e).value)


def test_estimate_all_table(tiny, slate):
    data, pi_e, q_hat = tiny
    df = estimate_all(data, pi_e, q_hat, clip=1.5, truth=0.8)
    assert df["name"].tolist() == ["logged", "ips", "snips", "ips(clip=1.5)", "dm", "dr", "dr(clip=1.5)"]
    assert set(df["unit"]) == {"row"}
    by_name = df.set_index("name")
    assert by_name.loc["logged", "value"] == pytest.approx(0.75)  # mean reward 3/4
    assert by_name.loc["dr", "error"] == pytest.approx(3.1366667 / 4 - 0.8)
    assert by_name.loc["ips", "covered"]  # 0.8 is inside 16/15 +- 0.886
    # (n,) pi_e: no DM / DR
    assert estimate_all(data, np.array([0.8, 0.2, 0.5, 0.5]), q_hat)["name"].tolist() == [
        "logged",
        "ips",
        "snips",
    ]
    sdata, spi = slate
    sdf = estimate_all(sdata, spi, truth={"request": 1.0})
    assert sdf["unit"].tolist() == ["row", "row", "row", "request"]
    assert sdf["error"].iloc[-1] == pytest.approx(0.25)
    assert sdf["error"].iloc[:3].isna().all()


# ----------------------------------------------------------------------------- synthetic bandit, replications
# Two equally likely contexts, three actions.
MU = np.array([[0.6, 0.7, 0.9], [0.8, 0.5, 0.65]])  # click probability
PI_B = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
PI_E = np.array([[0.1, 0.2, 0.7], [0.7, 0.1, 0.2]])
# truth = 0.5 (.1*.6 + .2*.7 + .7*.9) + 0.5 (.7*.8 + .1*.5 + .2*.65) = 0.5 * 0.83 + 0.5 * 0.74 = 0.785
TRUTH = 0.785
REPS, N = 400, 500


def _simulate(rng: np.random.Generator, n: int = N) -> tuple[LoggedBandit, np.ndarray]:
    x = rng.integers(0, 2, n)
    a = (rng.random(n)[:, None] > PI_B[x].cumsum(axis=1)).sum(axis=1)  # inverse-CDF draw from pi_b(.|x)
    r = (rng.random(n) < MU[x, a]).astype(np.float64)
    return LoggedBandit(a, r, PI_B[x, a], n_actions=3), x


Q_HAT = MU + np.array([[0.05, -0.1, 0.1], [0.05, 0.1, 0.0]])  # a deliberately biased reward model


def _per_row_variances() -> dict[str, float]:
    """Exact per-row variances of the IPS, SNIPS (asymptotic, first order) and DR terms under the model.

    Sums over the two equally likely contexts and pi_b's actions; r is Bernoulli(MU) and w = pi_e / pi_b:
    IPS w r: E[w^2 MU] - V^2;  SNIPS: E[w^2 (r - V)^2];  DR dm(x) + w (r - q): E[(dm + w (r - q))^2] - V^2.
    """
    w = PI_E / PI_B  # (2, 3)
    dm = (PI_E * Q_HAT).sum(1, keepdims=True)  # (2, 1)

    def mean(f):  # E over x (1/2 each) and a ~ pi_b(.|x)
        return float((0.5 * PI_B * f).sum())

    ips_var = mean(w**2 * MU) - TRUTH**2
    snips_var = mean(w**2 * (MU * (1 - TRUTH) ** 2 + (1 - MU) * TRUTH**2))
    dr_var = mean(MU * (dm + w * (1 - Q_HAT)) ** 2 + (1 - MU) * (dm - w * Q_HAT) ** 2) - TRUTH**2
    return {"ips": ips_var, "snips": snips_var, "dr": dr_var}


@pytest.fixture(scope="module")
def replications():
    rng = np.random.default_rng(2024)
    q_hat_table = Q_HAT
    rows = []
    for _ in range(REPS):
        data, x = _simulate(rng)
        pi, q = PI_E[x], q_hat_table[x]
        rows.append(
            {
                "ips": ips(data, pi),
                "snips": snips(data, pi).value,
                "dr": doubly_robust(data, pi, q).value,
                "dm": direct_method(data, pi, q).value,
            }
        )
    return rows


def test_direct_method_with_the_true_model_gives_the_truth():
    # Contexts exactly half and half and q_hat = MU: DM is mean_i sum_a pi_e(a|x_i) MU(x_i, a) = TRUTH, the
    # hand-worked value above (the actions and rewards do not enter).
    x = np.array([0, 1] * 50)
    data = LoggedBandit(np.zeros(100, dtype=np.int64), np.zeros(100), np.full(100, 0.5), n_actions=3)
    assert direct_method(data, PI_E[x], MU[x]).value == pytest.approx(TRUTH, rel=1e-12)


def test_ips_and_dr_are_unbiased(replications):
    for name in ("ips", "dr"):
        vals = np.array([r[name].value if name == "ips" else r[name] for r in replications])
        # the mean of REPS independent estimates is within 3 standard errors of the truth
        assert abs(vals.mean() - TRUTH) < 3 * vals.std(ddof=1) / np.sqrt(REPS), name
    # DM inherits the model's bias: 0.5 (.1*.05 - .2*.1 + .7*.1) + 0.5 (.7*.05 + .1*.1)
    #   = 0.5 * .055 + 0.5 * .045 = 0.05
    dm = np.array([r["dm"] for r in replications])
    assert dm.mean() - TRUTH == pytest.approx(0.05, abs=0.002)


def test_snips_and_dr_have_lower_variance_than_ips(replications):
    # The exact per-row variances (see _per_row_variances): IPS 2.67, SNIPS 0.49, DR 0.48, so both should
    # have ~0.18 of IPS's variance. Each sample variance over REPS = 400 replicates of a near-normal estimate
    # has relative sd sqrt(2 / 399) = 0.071; a ratio of two is within sqrt(2) * 0.071 = 0.10 (taken as
    # independent), so the measured ratio lies within 4 of those, 40%, of the exact one.
    var = {
        k: np.var([r[k].value if k == "ips" else r[k] for r in replications], ddof=1)
        for k in ("ips", "snips", "dr")
    }
    exact = _per_row_variances()
    for k in ("snips", "dr"):
        want = exact[k] / exact["ips"]  # 0.182, 0.179
        assert want < 0.2  # the claim itself: a fifth of IPS's variance or less
        assert var[k] / var["ips"] == pytest.approx(want, rel=4 * np.sqrt(2) * np.sqrt(2 / (REPS - 1))), k
    assert var["ips"] == pytest.approx(exact["ips"] / N, rel=4 * np.sqrt(2 / (REPS - 1)))


def test_ips_normal_interval_covers(replications):
    covered = np.mean([r["ips"].ci_low <= TRUTH <= r["ips"].ci_high for r in replications])
    # nominal 0.95; the sd of a coverage rate over 400 reps is sqrt(.95 * .05 / 400) = 0.011: within 4 sds
    assert abs(covered - 0.95) < 4 * np.sqrt(0.95 * 0.05 / REPS), covered


def test_weight_stats_mean_is_one_in_expectation():
    n = 20_000
    data, x = _simulate(np.random.default_rng(7), n)
    ws = weight_stats(data, PI_E[x], clip=5.0)
    # E[w] = sum_a pi_e = 1. Var(w) = E[w^2] - 1 = 0.5 (0.01/.6 + 0.04/.3 + 0.49/.1) + 0.5 (0.49/.2 + 0.01/.5
    # + 0.04/.3) - 1 = 2.83, so the mean of 20,000 weights has sd 0.012: within 4 sds (0.048) of 1.
    assert ws.mean_weight == pytest.approx(1.0, abs=4 * np.sqrt(2.83 / n))
    assert ws.max_weight == pytest.approx(7.0)  # 0.7 / 0.1, context 0 action 2
    # only that cell (probability 0.5 * 0.1 = 5% of rows) has w > 5: ~1000 rows, sd 31
    assert ws.clipped_frac == pytest.approx(0.05, abs=4 * np.sqrt(0.05 * 0.95 / n))
    assert 0 < ws.ess < n


# ----------------------------------------------------------------------------- bad logs and inputs


def _log(**override):
    fields = {"action": [0, 1, 0, 1], "reward": [1.0, 0.0, 1.0, 0.0], "propensity": [0.5, 0.5, 0.5, 0.5]}
    fields.update(override)
    return LoggedBandit(**{k: np.asarray(v) for k, v in fields.items()})


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"propensity": [0.5, 0.0, 0.5, -0.1]}, r"propensity must be in \(0, 1\]; rows \[1, 3\]"),
        ({"propensity": [0.5, 0.5, 1.5, 0.5]}, r"propensity must be in \(0, 1\]; rows \[2\]"),
        ({"propensity": [np.nan, 0.5, 0.5, 0.5]}, r"propensity .* rows \[0\]"),
        ({"reward": [1.0, np.nan, 1.0, np.inf]}, r"reward must be finite; rows \[1, 3\]"),
        ({"action": [0, 1, -1, 1]}, r"action out of range \[0, 2\); rows \[2\]"),
        ({"reward": [1.0, 0.0, 1.0]}, r"length mismatch: reward has 3 rows but action has 4"),
        ({"position": [0, 0, -1, 0]}, r"position must be >= 0.*rows \[2\]"),
    ],
)
def test_bad_logs_name_the_rows(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        _log(**override)


def test_action_beyond_n_actions_and_many_bad_rows():
    with pytest.raises(ValueError, match=r"action out of range \[0, 2\); rows \[3\] \(values \[5\]\)"):
        LoggedBandit(np.array([0, 1, 1, 5]), np.zeros(4), np.full(4, 0.5), n_actions=2)
    p = np.zeros(9)
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4\] \(and 4 more\)"):
        LoggedBandit(np.zeros(9, dtype=int), np.zeros(9), p)


def test_from_dataframe_missing_propensity_column_and_round_trip():
    df = pd.DataFrame({"action": [0, 1], "reward": [1.0, 0.0], "position": [0, 1]})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['propensity'\]"):
        LoggedBandit.from_dataframe(df)
    df["propensity"] = [0.5, np.nan]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        LoggedBandit.from_dataframe(df)
    df["propensity"] = [0.5, 0.25]
    df["ctx"] = [np.array([1.0, 2.0]), np.array([3.0, 4.0])]
    log = LoggedBandit.from_dataframe(df, context="ctx", n_actions=3)
    assert log.context.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    back = LoggedBandit.from_dataframe(log.to_dataframe(), context="context")
    for f in ("action", "reward", "propensity", "position", "context"):
        np.testing.assert_array_equal(getattr(back, f), getattr(log, f))
    assert back.n_actions == 3 and back.action.dtype == np.int64 and back.position.dtype == np.int64


def test_bad_estimator_inputs_name_the_rows(tiny):
    data, pi_e, q_hat = tiny
    bad_pi = pi_e.copy()
    bad_pi[2] = [0.5, 0.6]
    with pytest.raises(ValueError, match=r"pi_e rows must be probability distributions; rows \[2\]"):
        ips(data, bad_pi)
    bad_q = q_hat.copy()
    bad_q[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"q_hat must be finite; rows \[1\]"):
        direct_method(data, pi_e, bad_q)
    with pytest.raises(ValueError, match=r"shape \(n, n_actions\) = \(4, 2\)"):
        doubly_robust(data, pi_e, q_hat[:, :1])
    with pytest.raises(ValueError, match="clip must be > 0"):
        ips(data, pi_e, clip=0.0)
    with pytest.raises(ValueError, match="level must be in"):
        ips(data, pi_e, level=1.5)
    with pytest.raises(ValueError, match=r"ci \(CIConfig.method\) must be"):
        CIConfig(method="exact")
