"""Off-policy evaluation: the value (mean reward per request) of a target policy, from a collected log.

    python -m agents.ope --logs runs/logs/ads-v0__cascade-privileged__0.parquet --policy oracle [--env ads-v0]

Target policies: `random`, `cascade-privileged` (at `--target-temperature`, different from the logging one)
and `oracle`. The estimators are `gpr_sim.data.ope`'s (IPS, SNIPS, DM, DR, plus the mean logged reward):

- pi_e(a | x): the target's action distribution on each logged request: uniform for random, a one-hot
  on the pick of a deterministic policy (oracle, or the cascade at temperature 0), and for the cascade the
  exact softmax over its ranked pool.
- q_hat(x, a): the env's scoring API, ``score(candidates).value`` (the platform's own, imperfect
  pCTR/pCVR model: fatigue and drifted interests are invisible to it), times the eligibility mask of
  the ad's advertiser (budget / pacing).

Both need the hidden state of each logged request (interests, fatigue, budgets), which a log does not
hold. So the log is **re-simulated**: its metadata (world config, seeds, sizes, behaviour policy) drives
the same behaviour policy through the same market, and at every step, before the step, the target's
distribution and q_hat are computed on the live state (a log written before the rename names
``cascade-privileged`` by its former name ``cascade``; ``agents.policies.canonical_policy`` resolves it). The re-simulation must reproduce the log
exactly (candidates, rewards and propensities are checked) or the run stops. The log itself still
provides the actions, rewards and propensities the estimators read.

Only single-candidate logs (``num_candidates == 1``) are supported: with K > 1 the reward depends on the
whole ordered list, which is not the one-action bandit these estimators assume.

Per row the estimators only need pi_e and q_hat at the logged ad and the pi_e-weighted mean of q_hat,
so those are what is kept (memory O(rows), not O(rows x ads)). They are handed to the estimators as an
exactly equivalent two-action problem: action 0 is the logged ad, action 1 all other ads pooled, with
q_hat(pooled) = sum_{a != a_i} pi_e(a) q_hat(a) / (1 - pi_e(a_i)).

With ``--env ads-v0`` the target also runs online on the same users and seed, and two ground truths are
reported beside every estimate:

- `truth_online`: the target's mean reward per request when it actually runs (what a launch would
  see), averaged in its denoised form (`denoised_reward`: realised price + expected funnel value of
  the shown ad), which is unbiased for it with a fraction of the variance;
- `truth_bandit`: the target's expected reward on the *logged* requests (scoring API with the true
  probabilities, same states), which is what a one-step estimator targets. The gap between the two
  is the long-term effect (fatigue, session length, budgets) that no bandit estimator can see.
  Approximate: the scoring API ignores budget refusals within a step (many requests charging one
  advertiser at once), so in a crowded market it runs high by about the refused share, which is
  reported as `budget_refused` (1 - logged fill / the logged ads' P(win)).

It also sweeps the log size (prefixes of the log) and the logging temperature (fresh in-memory
``cascade-privileged`` logs at each temperature, for a log of that policy) and writes `estimates.csv/json`,
`sweep.csv`, `ope.png` and `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agents.cli import check_args, parse_args, run_main
from agents.evaluation.offpolicy import (
    TARGETS,
    add_truths,
    check_meta,
    check_reproduced,
    denoised_reward,
    estimate,
    online_run,
    plot,
    resimulate,
    size_sweep,
    temperature_option,
)
from agents.policies import canonical_policy
from gpr_sim.data.logs import read_logs
from gpr_sim.runs import atomic_write_with
from gpr_sim.stats import critical_value
from gpr_sim.world.config import check_range


@dataclass(frozen=True)
class Args:
    """CLI of `python -m agents.ope`."""

    logs: str = ""
    """Parquet log written by `python -m agents.collect` (single-candidate)"""
    policy: str = "cascade-privileged"
    """target policy (`agents.policies`): random | cascade-privileged | oracle"""
    target_temperature: float = 0.1
    """exploration temperature of a cascade target (0 = greedy)"""
    env: str = ""
    """the log's env id (ads-v0) to also run the target online: ground truths, sweeps, plot"""
    sweep_temperatures: tuple[float, ...] = (0.1, 0.3, 1.0)
    """logging temperatures of the error-vs-exploration sweep (cascade logs only; needs --env)"""
    size_points: int = 5
    """log sizes of the error-vs-size sweep: the first steps / 2^i steps of the log, i < size_points"""
    level: float = 0.95
    """coverage of the confidence intervals"""
    device: str = ""
    """torch device of the re-simulation; default: the log's"""
    threads: int = 1
    """torch CPU threads; 0 = torch's default"""
    out: str = ""
    """output folder; default runs/ope/{log name}__{policy}"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        check_args(self)
        if not self.logs:
            raise ValueError("logs is required: --logs PATH to a Parquet log from agents.collect")
        if canonical_policy(self.policy) not in TARGETS:
            raise ValueError(
                f"policy={self.policy!r} is not an off-policy target: expected one of {list(TARGETS)}"
            )
        check_range("target_temperature", self.target_temperature, 0.0, 100.0)
        for t in self.sweep_temperatures:
            check_range("sweep_temperatures", t, 0.0, 100.0, lo_open=True)
        check_range("size_points", self.size_points, 1, 30)
        check_range("level", self.level, 0.0, 1.0, lo_open=True)
        check_range("threads", self.threads, 0, 1024)


def run(args: Args) -> dict[str, pd.DataFrame]:
    """Estimate (and with ``args.env`` check against ground truth); writes the run folder."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    df, meta = read_logs(args.logs)
    check_meta(meta, args.logs)
    df = df.sort_values("request_id", ignore_index=True)
    if args.env and args.env != meta["env"]:
        raise ValueError(f"env={args.env!r} but {args.logs} was collected in {meta['env']!r}")
    device = args.device or meta.get("device", "cpu")
    t_target = args.target_temperature if canonical_policy(args.policy) == "cascade-privileged" else None
    target_options = temperature_option(t_target)
    t_log = meta.get("temperature")

    columns, stats, world = resimulate(meta, args.policy, target_options, t_log, device, args.progress)
    check_reproduced(df, columns, stats, args.logs)
    reward, propensity = df["reward"].to_numpy(), df["propensity"].to_numpy()
    table, diag = estimate(reward, propensity, stats, args.level)
    diag["logged_denoised"] = float(denoised_reward(columns, world).mean())
    # auctions the logged ads should win (scoring API) but that budgets refused within the step
    diag["budget_refused"] = float(1.0 - columns["impression"].mean() / stats["p_win"].mean())
    results = {"estimates": table}

    out = Path(args.out or f"runs/ope/{Path(args.logs).stem}__{args.policy}")
    out.mkdir(parents=True, exist_ok=True)
    if args.env:
        realized, online = online_run(meta, args.policy, target_options, device, args.progress)
        slot_means = online.mean(0)  # sessions in different slots are independent apart from budgets
        diag["truth_online"] = float(online.mean())
        diag["truth_online_se"] = float(slot_means.std(ddof=1) / np.sqrt(len(slot_means)))
        diag["online_realized"] = float(realized.mean())
        results["estimates"] = table = add_truths(table, diag["truth_online"], diag["truth_bandit"])
        parts = [size_sweep(reward, propensity, stats, online, args.size_points, args.level)]
        if canonical_policy(meta["policy"]) == "cascade-privileged":
            for temp in sorted(set(args.sweep_temperatures)):
                if t_log is not None and np.isclose(temp, t_log):
                    r_t, p_t, s_t = reward, propensity, stats  # the log itself
                else:
                    cols_t, s_t, _ = resimulate(
                        meta, args.policy, target_options, temp, device, args.progress
                    )
                    r_t, p_t = cols_t["reward"], cols_t["propensity"]
                t_table, t_diag = estimate(r_t, p_t, s_t, args.level)
                t_table = add_truths(t_table, diag["truth_online"], t_diag["truth_bandit"])
                parts.append(
                    t_table.assign(sweep="temperature", temperature=temp, rows=len(r_t), ess=t_diag["ess"])
                )
        results["sweep"] = sweep = pd.concat(parts, ignore_index=True)
        atomic_write_with(out / "sweep.csv", lambda tmp: sweep.to_csv(tmp, index=False))
        title = (
            f"{args.policy}{'' if t_target is None else f' (t={t_target:g})'} from "
            f"{meta['policy']} (t={t_log}) logs, {meta['num_envs']} envs x {meta['steps']} steps"
        )
        plot(sweep, out / "ope.png", title)

    atomic_write_with(out / "estimates.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_with(out / "estimates.json", lambda tmp: table.to_json(tmp, orient="records", indent=2))
    config = {
        "args": dataclasses.asdict(args),
        "log_meta": {k: v for k, v in meta.items() if k != "world_config"},
        "diagnostics": diag,
    }
    atomic_write_with(
        out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n")
    )
    results["diagnostics"] = diag

    cols = ["name", "value", "ci_low", "ci_high"] + [
        c for c in ("error_online", "error_bandit") if c in table
    ]
    with pd.option_context("display.float_format", "{:.5f}".format, "display.width", 160):
        print(
            f"target {args.policy} from {meta['policy']} logs ({args.logs}): {len(df)} requests, "
            f"mean reward {reward.mean():.5f} (denoised {diag['logged_denoised']:.5f}), mean weight "
            f"{diag['mean_weight']:.3f}, ESS {diag['ess']:.0f}, pi_e support under pi_b {diag['support']:.3f}"
        )
        if args.env:
            half = critical_value(args.level) * diag["truth_online_se"]
            print(
                f"truth: online {diag['truth_online']:.5f} +- {half:.5f} ({args.level:.0%} CI) (realized "
                f"{diag['online_realized']:.5f}), bandit (logged requests) {diag['truth_bandit']:.5f} (ignores "
                f"budget refusals: {diag['budget_refused']:.0%} of the logged ads' wins were refused)"
            )
        print(table[cols].to_string(index=False))
    print(f"wrote {out}")
    return results


def main(argv: list[str] | None = None) -> dict[str, pd.DataFrame]:
    return run(parse_args(Args, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
