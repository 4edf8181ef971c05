"""``oracle_share``: the true value a policy serves on fixed held-out requests, as a share of the myopic oracle's.

    states = RequestStates.build(OracleShareConfig(states=256))   # one fixed set of requests
    out = oracle_share(make_policy("cascade-privileged", states.env, seed=0), states)
    out["oracle_share"], out["oracle_share_ci_low"], out["oracle_share_ci_high"]
    # or keep the per-state values (a table) and summarise them later:
    summarize_shares(state_values(policy, states), level=0.9)

The primary learning curve of the evaluation protocol (``DESIGN.md``): deterministic, cheap and free of
the session noise of online metrics. Definitions, per request state s (N of them):

- the true value table ``v(s, a) = score(a, truth=True).value`` for every ad, times the eligibility mask
  (an ineligible ad shows nothing: value 0), the same expected reward ``agents.ope`` uses as ground truth;
- the policy's value ``E_{a ~ pi(.|s)} v(s, a)`` over its first candidate (its top pick; with the default
  ``num_candidates == 1``, the ad it serves). Exact for the policies whose action distribution
  ``agents.policies.distribution.action_distribution`` knows (random: uniform over every ad,
  cascade-privileged and learned-cascade: their softmax over their pool, oracle: one-hot on its pick); any other policy (``gpr:``) is
  the mean over ``samples`` calls of ``act`` (the generator is deterministic but for the refiner's seeded noise, so 1 sample is the default);
- the myopic oracle's value ``max_{a eligible} v(s, a)``, what ``agents.policies`` ``oracle`` serves
  (0 where no ad is eligible);
- ``oracle_share = sum_s policy(s) / sum_s oracle(s)`` with the delta-method ratio interval over states
  (``gpr_sim.stats.ratio_of_means``); ``oracle_fatigue_share`` is the same share of the fatigue-aware
  oracle (``oracle-fatigue``), which gives up a little immediate value for longer sessions (below 1).

The states: ``env.reset(seed)`` of a market with one slot per state (its first request of N sessions),
then optionally ``warmup`` steps under the seeded ``cascade-privileged`` (so not every state is a session start:
fatigue, ad load and budgets have moved). The same config gives the same states and the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from agents.evaluation.auction import attach_auction_model, auction_funnel_file
from agents.policies import CATALOG_CELLS, catalog_rows, make_policy, row_chunks
from agents.policies.cascade import CascadePolicy
from agents.policies.distribution import action_distribution
from agents.policies.learned_cascade import LearnedCascadePolicy
from agents.policies.oracle import CatalogScorer, OraclePolicy
from agents.policies.random import RandomPolicy
from envs import make_vec_env
from gpr_sim.stats import check_level, ratio_of_means

EXACT = (RandomPolicy, CascadePolicy, LearnedCascadePolicy, OraclePolicy)
"""policies valued over their exact action distribution (``agents.policies.distribution.action_distribution``)"""


@dataclass(frozen=True)
class OracleShareConfig:
    """Which request states ``oracle_share`` is measured on and how."""

    env: str = "ads-v0"
    """a registered ads env id"""
    preset: str = "small"
    """world preset"""
    world_seed: int = 0
    """seed of the static world"""
    device: str = "cpu"
    """torch device of the env and the policies"""
    states: int = 256
    """request states (one env slot each; small so a CPU evaluation stays fast)"""
    seed: int = 12345
    """reset seed of the states' market (and of the warm-up policy)"""
    warmup: int = 0
    """steps under the seeded ``cascade-privileged`` before the states are taken (0: the first request of each
    session)"""
    samples: int = 1
    """calls of ``act`` averaged for a policy without an exact action distribution"""
    level: float = 0.95
    """coverage of the interval"""
    auction: str = ""
    """a platform folder whose learned pCTR/pCVR the states' market auction ranks on (``agents.evaluation.auction``);
    empty = the privileged auction"""

    def __post_init__(self) -> None:
        auction_funnel_file(self.auction)
        for name, lo in (("states", 1), ("warmup", 0), ("samples", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: expected an integer >= {lo}")
        for name in ("seed", "world_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} is invalid: expected an integer")
        if not (isinstance(self.level, float) and math.isfinite(self.level)):
            raise ValueError(f"level={self.level!r} is invalid: expected a finite float in (0, 1)")
        check_level(self.level)


@dataclass
class RequestStates:
    """A fixed set of request states: the env positioned on them, their observation and true value table."""

    env: object
    """the ads-v0 vector env whose current requests are the states (policies bind to it)"""
    obs: dict[str, torch.Tensor]
    """the batched observation of the N states"""
    values: torch.Tensor
    """(N, num_ads) true expected value of each ad, 0 for ineligible ads, in the scoring's own precision (float32):
    a float64 copy of float32 scores holds the same numbers in twice the memory (on the large preset 512 states x 1M
    ads are 1.9 GiB instead of 3.8 of every learner's GPU); every sum over it is taken in float64"""
    eligible: torch.Tensor
    """(num_ads,) bool eligibility at the states"""
    config: OracleShareConfig

    @classmethod
    def build(cls, config: OracleShareConfig) -> RequestStates:
        env = make_vec_env(
            config.env,
            config.states,
            preset=config.preset,
            world_seed=config.world_seed,
            device=config.device,
            validate_actions=False,
        )
        attach_auction_model(env, config.auction)
        return cls.from_env(env, config)

    @classmethod
    @torch.no_grad()
    def from_env(cls, env, config: OracleShareConfig) -> RequestStates:
        """The states of ``env`` (N = ``env.num_envs`` slots) after ``reset(config.seed)`` and the warm-up."""
        obs, _ = env.reset(seed=config.seed)
        if config.warmup:
            reference = make_policy("cascade-privileged", env, config.seed)
            for _ in range(config.warmup):
                obs, *_ = env.step(reference.act(obs).action)
        vec = env.unwrapped
        return cls(env, obs, true_values(vec), vec.eligible_ads(), config)

    @property
    def oracle_values(self) -> torch.Tensor:
        """(N,) float64 the myopic oracle's value: the best eligible ad's, 0 where none is eligible."""
        best = self.values.masked_fill(~self.eligible, float("-inf")).max(1).values.double()
        return best if bool(self.eligible.any()) else torch.zeros_like(best)


def _true_value_chunks(vec, chunk_size: int, cells: int):
    """(row slice, (rows, num_ads) true values of every ad, as scored: float32) over the env's current requests, in
    chunks of at most ``chunk_size`` rows and ``cells`` (request, ad) pairs."""
    n, num_ads = vec.num_envs, vec.config.num_ads
    # the oracle's scoring, eager: built once per evaluation, where compiling would cost more than it saves
    # (the oracle policy, scoring at every step, compiles on CUDA)
    scorer = CatalogScorer(vec, compile=False)
    for sl in row_chunks(n, catalog_rows(chunk_size, num_ads, cells)):
        yield sl, scorer(vec.state.select(torch.arange(n, device=vec.device)[sl]))


def true_values(vec, chunk_size: int = 2048, cells: int = CATALOG_CELLS) -> torch.Tensor:
    """(N, num_ads) ``score(a, truth=True).value`` of every ad at the env's N current requests, in the scoring's
    precision (float32; ``RequestStates.values``), times the eligibility mask (scored in row chunks of at most
    ``chunk_size`` rows and ``cells`` (request, ad) pairs, as ``OraclePolicy`` does, bounding memory)."""
    out = torch.empty(vec.num_envs, vec.config.num_ads, dtype=torch.float32, device=vec.device)
    for sl, values in _true_value_chunks(vec, chunk_size, cells):
        out[sl] = values
    return out.mul_(vec.eligible_ads()[None])  # in place: on the large preset a 2,048-state table is 7.6 GiB


def best_true_values(vec, chunk_size: int = 2048, cells: int = CATALOG_CELLS) -> torch.Tensor:
    """(N,) float64 the highest true value over the eligible ads at each of the env's current requests (-inf
    where none is eligible), without holding the (N, num_ads) matrix: the myopic oracle's value."""
    eligible = vec.eligible_ads()
    out = torch.empty(vec.num_envs, dtype=torch.float64, device=vec.device)
    for sl, values in _true_value_chunks(vec, chunk_size, cells):
        out[sl] = values.masked_fill(~eligible, float("-inf")).max(1).values
    return out


@torch.no_grad()
def policy_values(policy, states: RequestStates, cells: int = CATALOG_CELLS) -> torch.Tensor:
    """(N,) float64 expected true value of the policy's first candidate at each state (module doc); an exact
    distribution is read in chunks of at most ``cells`` (state, ad) pairs (the random policy's is every ad)."""
    if isinstance(policy, EXACT):
        dist = action_distribution(policy, states.obs)  # (N, P) ads and probabilities
        out = torch.empty(states.values.shape[0], dtype=torch.float64, device=states.values.device)
        for sl in row_chunks(len(out), catalog_rows(len(out), dist.ads.shape[1], cells)):
            out[sl] = (dist.prob[sl] * states.values[sl].gather(1, dist.ads[sl]).double()).sum(1)
        return out
    total = torch.zeros(states.values.shape[0], dtype=torch.float64, device=states.values.device)
    for _ in range(states.config.samples):
        pick = policy.act(states.obs).action[:, :1]  # (N, 1)
        total += states.values.gather(1, pick)[:, 0].double()
    return total / states.config.samples


def state_values(policy, states: RequestStates) -> dict[str, torch.Tensor]:
    """Per state (N,) float64: the policy's expected true value (``policy``), the myopic oracle's (``oracle``)
    and the fatigue-aware oracle's (``oracle_fatigue``): everything the shares are computed from."""
    fatigue = make_policy("oracle-fatigue", states.env, states.config.seed)
    return {
        "policy": policy_values(policy, states),
        "oracle": states.oracle_values,
        "oracle_fatigue": policy_values(fatigue, states),
    }


def share(values, oracle, level: float, key: str) -> dict[str, float]:
    """``sum(values) / sum(oracle)`` over states with its delta-method interval, keyed ``key`` (+ CI)."""
    est = ratio_of_means(
        np.asarray(values, dtype=np.float64), np.asarray(oracle, dtype=np.float64), level, key
    )
    return {key: est.value, f"{key}_ci_low": est.ci_low, f"{key}_ci_high": est.ci_high}


def summarize_shares(values: Mapping[str, object], level: float = 0.95) -> dict[str, float]:
    """The shares of ``state_values`` (tensors or arrays, e.g. read back from a table): ``oracle_share`` and
    ``oracle_fatigue_share`` with their intervals, the policy's and the oracle's mean value per state and
    the number of states."""
    cols = {
        k: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
        for k, v in values.items()
    }
    return {
        **share(cols["policy"], cols["oracle"], level, "oracle_share"),
        **share(cols["oracle_fatigue"], cols["oracle"], level, "oracle_fatigue_share"),
        "policy_value": float(cols["policy"].mean()),
        "oracle_value": float(cols["oracle"].mean()),
        "oracle_states": len(cols["oracle"]),
    }


def oracle_share(policy, states: RequestStates) -> dict[str, float]:
    """The policy's ``oracle_share`` on ``states`` (module doc), with ``summarize_shares``' other numbers."""
    return summarize_shares(state_values(policy, states), states.config.level)
