"""Off-policy evaluation checked against the simulator: a log re-simulated with a hook that records, per logged
request, what the estimators need (pi_e and q_hat at the logged ad, the pi_e-weighted q_hat) and the ground truth
(the target's true expected reward on the same state); the estimators of ``gpr_sim.data.ope`` on the equivalent
two-action problem; the target run online for the truth a launch would see; the plot of estimate minus truth.
``python -m agents.ope`` is its command line (its doc describes the method and what each truth means)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agents.collection import collect
from agents.policies import canonical_policy, make_policy
from agents.policies.distribution import action_distribution, prob_of
from envs import make_vec_env
from gpr_sim.data.bandit import LoggedBandit
from gpr_sim.data.logs import stack_list_column
from gpr_sim.data.ope import estimate_all, weight_stats
from gpr_sim.runs import atomic_write_with
from gpr_sim.world import WorldConfig, expected_weighted_reward

TARGETS = ("random", "cascade-privileged", "oracle")
"""the policies of ``agents.policies`` whose exact action distribution ``action_distribution`` knows"""
ESTIMATORS = ("logged", "ips", "snips", "dm", "dr")
REQUIRED_META = ("env", "world_config", "world_seed", "seed", "policy", "num_envs", "steps")


# ----------------------------------------------------------------------------- action distributions


def expected_reward(env, ads: torch.Tensor, eligible: torch.Tensor, truth: bool) -> torch.Tensor:
    """(N, P) expected immediate reward of each ad from the scoring API; ineligible ads are not shown."""
    return env.unwrapped.score(ads, truth=truth).value.double() * eligible[ads]


def ope_hook(behaviour, target):
    """A `collect` hook recording, per request, what the estimators and the ground truth need."""

    def hook(env, obs, out) -> dict[str, torch.Tensor]:
        vec = env.unwrapped
        logged = out.action[:, 0]
        eligible = vec.eligible_ads()
        d_e, d_b = action_distribution(target, obs), action_distribution(behaviour, obs)
        b_support = torch.zeros(
            obs["user_id"].shape[0], vec.config.num_ads, dtype=torch.bool, device=logged.device
        )
        b_support.scatter_(1, d_b.ads, d_b.prob > 0)
        return {
            "pi_e": prob_of(d_e, logged),  # pi_e(a_i | x_i)
            "pi_b": prob_of(d_b, logged),  # recomputed behaviour propensity (checked against the log)
            "q_logged": expected_reward(env, logged[:, None], eligible, truth=False)[:, 0],
            "dm": (d_e.prob * expected_reward(env, d_e.ads, eligible, truth=False)).sum(1),
            "v_true": (d_e.prob * expected_reward(env, d_e.ads, eligible, truth=True)).sum(1),
            "support": (d_e.prob * b_support.gather(1, d_e.ads)).sum(1),  # pi_e mass that pi_b can log
            "p_win": env.unwrapped.score(logged[:, None]).p_win[:, 0].double() * eligible[logged],
        }

    return hook


# ----------------------------------------------------------------------------- re-simulation


def temperature_option(temperature: float | None) -> dict[str, float]:
    """The registry option of a cascade's exploration temperature (None: the policy's default)."""
    return {} if temperature is None else {"temperature": temperature}


def check_meta(meta: dict, path: str) -> WorldConfig:
    """The log's world config, after checking it has the provenance re-simulation needs."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(
            f"{path} lacks metadata {missing}: off-policy evaluation re-simulates the log, so it needs a log "
            f"written by `python -m agents.collect`"
        )
    cfg = WorldConfig.from_dict(meta["world_config"])
    if cfg.num_candidates != 1:
        raise ValueError(
            f"num_candidates={cfg.num_candidates} in {path}: off-policy evaluation here needs single-candidate "
            f"logs (num_candidates=1); with K > 1 the reward depends on the whole ordered list"
        )
    return cfg


def resimulate(
    meta: dict,
    target: str,
    target_options: dict,
    behaviour_temperature: float | None,
    device: str,
    progress: bool,
):
    """Run the log's behaviour policy again (at ``behaviour_temperature``) with the OPE hook.

    ``target`` (one of ``TARGETS``) with ``target_options`` (``make_policy``'s) is the evaluated policy.

    Returns:
        (columns, stats, world): the log columns and the per-row statistics of `ope_hook` as numpy
        arrays, and the static world they were simulated in.
    """
    env = log_env(meta, device)
    behaviour_name = canonical_policy(meta["policy"])  # an old log's former name, silently
    behaviour = make_policy(behaviour_name, env, meta["seed"], **temperature_option(behaviour_temperature))
    target_policy = make_policy(target, env, meta["seed"], **target_options)
    columns, stats = collect(
        env, behaviour, meta["seed"], meta["steps"], ope_hook(behaviour, target_policy), progress
    )
    return columns, stats, env.unwrapped.world


def check_reproduced(
    df: pd.DataFrame, columns: dict[str, np.ndarray], stats: dict[str, np.ndarray], path: str = "the log"
) -> None:
    """Stop unless the re-simulation matches the log (same candidates, rewards and propensities).

    The log's own values were checked at load (``read_logs``: finite propensities in (0, 1]), so a row
    count that differs from its metadata's ``steps x num_envs`` is a cut or edited log, and a non-finite
    recomputed propensity is the behaviour policy's, not a divergence.
    """
    if len(df) != len(columns["reward"]):
        raise ValueError(
            f"{path} has {len(df)} rows, but its metadata (steps x num_envs) re-simulates {len(columns['reward'])}: "
            f"a cut or edited log?"
        )
    bad = np.flatnonzero(~np.isfinite(stats["pi_b"]))
    if bad.size:
        raise RuntimeError(
            f"the behaviour policy's recomputed propensity is not finite at request_id "
            f"{df['request_id'].to_numpy()[bad[:5]].tolist()} ({len(bad)} rows): its action distribution "
            f"(action_distribution) is undefined there, while {path} holds finite ones"
        )
    checks = {
        "candidates": (stack_list_column(df, "candidates") == columns["candidates"]).all(1),
        "reward": df["reward"].to_numpy() == columns["reward"],
        "propensity": np.isclose(df["propensity"].to_numpy(), stats["pi_b"], rtol=1e-9, atol=0.0),
    }
    for name, ok in checks.items():
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise RuntimeError(
                f"re-simulation diverged from the log in column {name!r} at request_id "
                f"{df['request_id'].to_numpy()[bad[:5]].tolist()} ({len(bad)} rows): was it written by another "
                f"code version or device? ({'recomputed propensities' if name == 'propensity' else 'replayed steps'})"
            )


def denoised_reward(columns: dict[str, np.ndarray], world) -> np.ndarray:
    """(n,) E[reward | state, ad, auction and budget outcome] of single-slot requests.

    THE reward formula (``gpr_sim.world.reward.expected_weighted_reward``) of the realised price, the
    expected funnel value of the shown ad under the true probabilities (``p_click``, ``p_conversion``,
    mean order value) and the realised stay outcome (the log holds no exit probability; the outcome is
    unbiased for it). Conditioning on the realised auction and budget outcome keeps it unbiased for the
    realised reward (budget refusals included, which the scoring API does not model) while dropping the
    click / conversion / order-value noise. With delayed conversions it credits the expected order value
    to the request that earned it.
    """
    shown = torch.as_tensor(columns["shown_ad"][:, 0])
    order_value = world.ad_value_mean.cpu().double()[shown.clamp(min=0)] * (shown >= 0)
    value = expected_weighted_reward(
        world.config.reward,
        torch.as_tensor(columns["revenue"]),
        torch.as_tensor(columns["p_click"]),
        torch.as_tensor(columns["p_conversion"]),
        order_value,
        torch.as_tensor(~columns["terminated"]).double(),
    )
    return value.numpy()


def log_env(meta: dict, device: str):
    """A fresh vector env of the log's market: its env id, world config, world seed and size."""
    cfg = WorldConfig.from_dict(meta["world_config"])
    return make_vec_env(
        meta["env"], meta["num_envs"], config=cfg, world_seed=meta["world_seed"], device=device
    )


def online_run(
    meta: dict, target: str, target_options: dict, device: str, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The target run online on the log's users, seed and sizes.

    Returns:
        (realized, denoised), each (T, N): the rewards drawn and `denoised_reward`. Both estimate the
        same value; the denoised one has a fraction of the variance, so it is the ground truth used.
    """
    env = log_env(meta, device)
    policy = make_policy(target, env, meta["seed"], **target_options)
    columns, _ = collect(env, policy, meta["seed"], meta["steps"], progress=progress)
    shape = (meta["steps"], meta["num_envs"])
    return columns["reward"].reshape(shape), denoised_reward(columns, env.unwrapped.world).reshape(shape)


# ----------------------------------------------------------------------------- estimation


def bandit_view(reward: np.ndarray, propensity: np.ndarray, stats: dict[str, np.ndarray]):
    """The exactly equivalent two-action problem (logged ad | all others) for `gpr_sim.data.ope`.

    Returns:
        (data, pi_e, q_hat) with pi_e, q_hat of shape (n, 2).
    """
    pe = np.clip(stats["pi_e"], 0.0, 1.0)
    rest = 1.0 - pe
    q_rest = np.divide(stats["dm"] - pe * stats["q_logged"], rest, out=np.zeros_like(rest), where=rest > 0)
    data = LoggedBandit(
        action=np.zeros(len(reward), dtype=np.int64), reward=reward, propensity=propensity, n_actions=2
    )
    return data, np.stack([pe, rest], 1), np.stack([stats["q_logged"], q_rest], 1)


def estimate(
    reward: np.ndarray, propensity: np.ndarray, stats: dict[str, np.ndarray], level: float
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Every estimator on one log, plus diagnostics (mean weight, ESS, support, bandit truth)."""
    data, pi_e, q_hat = bandit_view(reward, propensity, stats)
    table = estimate_all(data, pi_e, q_hat, level=level)
    ws = weight_stats(data, pi_e)
    diag = {
        "rows": len(reward),
        "mean_weight": ws.mean_weight,
        "max_weight": ws.max_weight,
        "ess": ws.ess,
        "support": float(stats["support"].mean()),
        "truth_bandit": float(stats["v_true"].mean()),
    }
    return table, diag


def add_truths(table: pd.DataFrame, truth_online: float | None, truth_bandit: float) -> pd.DataFrame:
    """Error and interval coverage of every estimate against each ground truth."""
    table = table.copy()
    for name, truth in (("online", truth_online), ("bandit", truth_bandit)):
        if truth is None:
            continue
        table[f"truth_{name}"] = truth
        table[f"error_{name}"] = table["value"] - truth
        table[f"covered_{name}"] = (table["ci_low"] <= truth) & (truth <= table["ci_high"])
    return table


def size_sweep(
    reward: np.ndarray,
    propensity: np.ndarray,
    stats: dict[str, np.ndarray],
    online: np.ndarray,
    points: int,
    level: float,
) -> pd.DataFrame:
    """Estimates on the first T / 2^i collection steps of the log (i < points), against the same prefix truths."""
    steps, n = online.shape
    sizes = sorted({max(1, steps >> i) for i in range(points)})
    rows = []
    for m in sizes:
        k = m * n  # rows are step-major
        sub = {key: v[:k] for key, v in stats.items()}
        table, diag = estimate(reward[:k], propensity[:k], sub, level)
        table = add_truths(table, float(online[:m].mean()), diag["truth_bandit"])
        rows.append(table.assign(sweep="size", rows=k, steps=m))
    return pd.concat(rows, ignore_index=True)


def plot(sweep: pd.DataFrame, path: Path, title: str) -> None:
    """Estimate - online truth (with the estimate's interval) against log size and logging temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = [("size", "rows", "log size (requests)"), ("temperature", "temperature", "logging temperature")]
    panels = [p for p in panels if (sweep["sweep"] == p[0]).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, x, label) in zip(axes[0], panels):
        part = sweep[sweep["sweep"] == kind]
        for i, name in enumerate(ESTIMATORS):
            est = part[part["name"] == name].sort_values(x)
            shift = 1.0 + 0.03 * (i - len(ESTIMATORS) // 2)  # side by side on the log axis
            err = est["error_online"]
            yerr = np.stack([est["value"] - est["ci_low"], est["ci_high"] - est["value"]])
            ax.errorbar(est[x] * shift, err, yerr=yerr, marker="o", ms=4, capsize=2, label=name)
        floor = part.drop_duplicates(x).sort_values(x)
        ax.plot(
            floor[x],
            floor["truth_bandit"] - floor["truth_online"],
            "k--",
            lw=1,
            label="bandit - online truth",
        )
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("estimate - online truth (reward / request)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
