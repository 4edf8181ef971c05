"""Every policy that acts in ads-v0, with one API and one registry.

    policy = make_policy("cascade", env, seed=0, temperature=0.3)
    out = policy.act(obs)  # PolicyOutput: (N, K) candidate ads, (N,) propensity

| name | file | what it is |
|---|---|---|
| `random` | `random.py` | uniform ads (a floor) |
| `cascade` | `cascade.py` | retrieval -> pre-ranking -> eCPM ranking -> softmax exploration with propensities (the behaviour policy of logged data); option `temperature` |
| `oracle` | `oracle.py` | top-K eligible ads by true expected immediate reward (a myopic upper bound; reads hidden state) |
| `oracle-fatigue` | `oracle.py` | the oracle charged for the fatigue it causes; option `fatigue_penalty` |
| `learned-cascade:PATH` | `learned_cascade.py` | the cascade built from logs on the platform view: two-tower retrieval -> distilled pre-ranking -> learned-funnel ranking -> softmax exploration, the models of platform folder PATH (`agents.fit_platform`); option `temperature` |
| `gpr:PATH` | `gpr.py` | the GPR generator of a run folder (`agents.pretrain` or `agents.hepo`); options `beam_width`, `rank` (`logprob` / `value`) |

Policies act on batched torch observations and bind to the env they act in: an ads-v0 vector env
(through any wrapper) or its ``envs.market.BatchedMarket``; both offer the same reads (``world``,
``config``, ``device``, ``state``, ``eligible_ads()``, ``score()``), so no policy reaches into an engine.

The registry builds a policy module only when it is asked for (the policy modules import this one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from envs import AdsVectorEnv, BatchedMarket


class PolicyOutput(NamedTuple):
    """What a policy proposes for N requests."""

    action: torch.Tensor  # (N, K) int64 candidate ads, in the policy's order
    propensity: torch.Tensor  # (N,) float64 probability of proposing exactly this ordered list


@runtime_checkable
class Policy(Protocol):
    """Anything that proposes candidate ads for a batch of requests."""

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        """Candidates and their propensity for the N requests of ``obs`` (batched ads-v0 observation)."""
        ...


def batched_env(env) -> AdsVectorEnv | BatchedMarket:
    """The env a policy binds to: an ads-v0 vector env (unwrapped) or a ``BatchedMarket``.

    Raises:
        ValueError: for anything else, e.g. the single (numpy) env.
    """
    env = getattr(env, "unwrapped", env)
    if not isinstance(env, (AdsVectorEnv, BatchedMarket)):
        raise ValueError(f"expected an ads-v0 vector env or a BatchedMarket, got {type(env).__name__}")
    return env


def row_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of ``size`` rows covering ``range(n)``: requests scored against many ads at once, bounded memory."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ----------------------------------------------------------------------------- the registry

PolicyFactory = Callable[..., Policy]
"""``factory(env, seed, **options) -> Policy``"""


def _random(env, seed: int = 0) -> Policy:
    from agents.policies.random import RandomPolicy

    return RandomPolicy(env, seed=seed)


def _cascade(env, seed: int = 0, temperature: float | None = None) -> Policy:
    """``temperature``: softmax exploration over log platform value (None = ``CascadeConfig``'s, 0 = greedy)."""
    from agents.policies.cascade import CascadeConfig, CascadePolicy

    cfg = CascadeConfig() if temperature is None else CascadeConfig(temperature=temperature)
    return CascadePolicy(env, cfg, seed=seed)


def _oracle(env, seed: int = 0) -> Policy:
    from agents.policies.oracle import OraclePolicy

    return OraclePolicy(env)


def _oracle_fatigue(env, seed: int = 0, fatigue_penalty: float | None = None) -> Policy:
    """``fatigue_penalty``: currency per unit of fatigue caused (None = ``FATIGUE_AWARE_PENALTY``)."""
    from agents.policies.oracle import FATIGUE_AWARE_PENALTY, OraclePolicy

    return OraclePolicy(
        env, fatigue_penalty=FATIGUE_AWARE_PENALTY if fatigue_penalty is None else fatigue_penalty
    )


def _gpr(run_dir: str) -> PolicyFactory:
    from agents.policies.gpr import gpr_factory

    return gpr_factory(run_dir)


def _gpr_inputs(run_dir: str) -> list[Path]:
    from agents.policies.gpr import run_inputs

    return run_inputs(run_dir)


def _learned_cascade(path: str) -> PolicyFactory:
    from agents.policies.learned_cascade import learned_cascade_factory

    return learned_cascade_factory(path)


def _learned_cascade_inputs(path: str) -> list[Path]:
    from agents.policies.learned_cascade import learned_cascade_inputs

    return learned_cascade_inputs(path)


class Family(NamedTuple):
    """Parametrised policies named ``NAME:ARG``."""

    arg: str
    """what ARG is, for messages (``gpr:PATH``)"""
    factory: Callable[[str], PolicyFactory]
    """``factory(ARG)`` -> the policy factory; raises ``ValueError`` for a bad ARG (before any env exists)"""
    inputs: Callable[[str], list[Path]] = lambda arg: []
    """``inputs(ARG)`` -> the files the policy reads (what a cache of its results is keyed by); none by default"""


POLICIES: dict[str, PolicyFactory] = {
    "random": _random,
    "cascade": _cascade,
    "oracle": _oracle,
    "oracle-fatigue": _oracle_fatigue,
}
"""Policies by name."""

FAMILIES: dict[str, Family] = {
    "gpr": Family("PATH", _gpr, _gpr_inputs),
    "learned-cascade": Family("PATH", _learned_cascade, _learned_cascade_inputs),
}
"""Parametrised policies ``NAME:ARG`` by NAME."""


def known_policies() -> list[str]:
    """Every name ``make_policy`` accepts, families as ``NAME:ARG``, sorted."""
    return sorted([*POLICIES, *(f"{name}:{fam.arg}" for name, fam in FAMILIES.items())])


def policy_factory(spec: str) -> PolicyFactory:
    """The factory of a policy name (``random``) or ``NAME:ARG`` spec (``gpr:runs/hepo/RUN``).

    Checks the spec without building anything, so a command line fails on its arguments before it runs.

    Raises:
        ValueError: an unknown name (listing ``known_policies()``) or a family's bad ARG.
    """
    family, sep, arg = spec.partition(":")
    if not sep and spec in POLICIES:
        return POLICIES[spec]
    if sep and family in FAMILIES and arg:
        return FAMILIES[family].factory(arg)
    raise ValueError(f"unknown policy {spec!r}: expected one of {', '.join(known_policies())}")


def policy_inputs(spec: str) -> list[Path]:
    """The files the policy ``spec`` reads (a family's run folder files); [] for the built-in policies."""
    family, sep, arg = spec.partition(":")
    return FAMILIES[family].inputs(arg) if sep and family in FAMILIES else []


def policy_options(spec: str) -> list[str]:
    """The options (keyword arguments beyond env and seed) the policy ``spec`` takes."""
    return _options(policy_factory(spec))


def _options(factory: PolicyFactory) -> list[str]:
    return [p for p in inspect.signature(factory).parameters if p not in ("env", "seed")]


def make_policy(spec: str, env, seed: int = 0, **options) -> Policy:
    """Build the policy ``spec`` (a name or ``NAME:ARG``, ``known_policies()``) bound to ``env``.

    Args:
        spec: e.g. ``"cascade"``, ``"oracle-fatigue"``, ``"gpr:runs/hepo/RUN"``.
        env: an ads-v0 vector env or a ``BatchedMarket`` (``batched_env``).
        seed: seed of the policy's own randomness (exploration, refiner noise).
        **options: the policy's options (table in the module doc), e.g. ``temperature`` of the cascade.

    Raises:
        ValueError: an unknown spec (listing the known ones) or an option the policy does not take.
    """
    factory = policy_factory(spec)
    takes = _options(factory)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"policy {spec!r} takes no option {unknown}: its options are {takes}")
    return factory(env, seed, **options)


__all__ = [
    "FAMILIES",
    "POLICIES",
    "Family",
    "Policy",
    "PolicyFactory",
    "PolicyOutput",
    "batched_env",
    "known_policies",
    "make_policy",
    "policy_factory",
    "policy_inputs",
    "policy_options",
    "row_chunks",
]
