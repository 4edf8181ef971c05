"""Every policy that acts in ads-v0, with one API and one registry.

    policy = make_policy("cascade-privileged", env, seed=0, temperature=0.3)
    out = policy.act(obs)  # PolicyOutput: (N, K) candidate ads, (N,) propensity

| name | file | what it is |
|---|---|---|
| `random` | `random.py` | uniform ads (a floor) |
| `cascade-privileged` | `cascade.py` | retrieval -> pre-ranking -> eCPM ranking -> softmax exploration with propensities, on the simulator's secrets (the user's latent interest, true ad embeddings, the truth's functional form): a labelled reference like the oracle, and the default behaviour policy of logged data; option `temperature`. `cascade` is its deprecated former name |
| `oracle` | `oracle.py` | top-K eligible ads by true expected immediate reward (a myopic upper bound; reads hidden state) |
| `oracle-fatigue` | `oracle.py` | the oracle charged for the fatigue it causes; option `fatigue_penalty` |
| `learned-cascade:PATH` | `learned_cascade.py` | the cascade built from logs on the platform view: two-tower retrieval -> distilled pre-ranking -> learned-funnel ranking -> softmax exploration, the models of platform folder PATH (`agents.fit_platform`); option `temperature` |
| `gpr:PATH` | `gpr.py` | the GPR generator of a run folder (`agents.pretrain` or `agents.hepo`); options `beam_width`, `rank` (`logprob` / `value`), `precision` (`fp32` / `bf16`) |

Policies act on batched torch observations and bind to the env they act in: an ads-v0 vector env
(through any wrapper) or its ``envs.market.BatchedMarket``; both offer the same reads (``world``,
``config``, ``device``, ``state``, ``eligible_ads()``, ``score()``), so no policy reaches into an engine.

Policies that read what no platform has (``PRIVILEGED``: the oracles, ``cascade-privileged``) are labelled
references: tables and charts show them as ``policy_label(spec)``, e.g. ``cascade-privileged (reference)``.

``ALIASES`` maps former names to the current ones: ``make_policy`` accepts them with a ``FutureWarning`` (a
deprecation that command-line users see too: Python hides a ``DeprecationWarning`` outside ``__main__``), and
``canonical_policy`` resolves them silently, for the names old logs and run folders store.

The registry builds a policy module only when it is asked for (the policy modules import this one).
"""

from __future__ import annotations

import functools
import inspect
import warnings
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


CATALOG_CELLS = 1 << 22
"""(request, ad) pairs scored at once when requests are scored against the whole catalog. Per-row candidates
make the scoring API gather a D-dim embedding per pair (4M pairs: ~0.5 GB per temporary at D = 32; 2,048
requests x the large preset's 1M ads asked an H200 for 244 GiB); the whole catalog as a broadcast view (the
oracle's) is gathered once per chunk, and on the CPU 16M-pair chunks were 3x slower than 4M
(``benchmarks/bench_oracle.py --cells``; on a GPU unmeasured)."""


def catalog_rows(size: int, num_ads: int, cells: int = CATALOG_CELLS) -> int:
    """Rows per chunk when each row is scored against ``num_ads`` ads: ``size`` at most, and at most ``cells``
    pairs (at least one row)."""
    return max(1, min(size, cells // max(num_ads, 1)))


# ----------------------------------------------------------------------------- the registry

PolicyFactory = Callable[..., Policy]
"""``factory(env, seed, **options) -> Policy``"""


def _random(env, seed: int = 0) -> Policy:
    from agents.policies.random import RandomPolicy

    return RandomPolicy(env, seed=seed)


def _cascade_privileged(env, seed: int = 0, temperature: float | None = None) -> Policy:
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
    "cascade-privileged": _cascade_privileged,
    "oracle": _oracle,
    "oracle-fatigue": _oracle_fatigue,
}
"""Policies by name."""

ALIASES: dict[str, str] = {"cascade": "cascade-privileged"}
"""Former policy names -> current ones (old logs' ``policy`` metadata and run folders hold the former)."""

PRIVILEGED: frozenset[str] = frozenset({"cascade-privileged", "oracle", "oracle-fatigue"})
"""Policies that read the simulator's hidden state: labelled references, never methods to beat."""

FAMILIES: dict[str, Family] = {
    "gpr": Family("PATH", _gpr, _gpr_inputs),
    "learned-cascade": Family("PATH", _learned_cascade, _learned_cascade_inputs),
}
"""Parametrised policies ``NAME:ARG`` by NAME."""


def known_policies() -> list[str]:
    """Every name ``make_policy`` accepts, families as ``NAME:ARG``, sorted."""
    return sorted([*POLICIES, *(f"{name}:{fam.arg}" for name, fam in FAMILIES.items())])


OPTION_SEP = "@"
"""``NAME[:ARG]@key=value@key=value``: options written into a spec, so a comma-separated agent list (``agents.evaluate
--agents``) can hold one policy twice with different options, e.g. ``cascade-privileged@temperature=0`` (greedy)
beside ``cascade-privileged`` (exploring)"""


def _option_value(text: str) -> bool | int | float | str:
    """An option's value as written in a spec: true / false, an int, a float, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_spec(spec: str) -> tuple[str, dict[str, bool | int | float | str]]:
    """``"NAME[:ARG]@k=v@..."`` -> (``"NAME[:ARG]"``, {k: v}); a spec without options gives {}.

    Raises:
        ValueError: an option that is not ``key=value``, or a key given twice.
    """
    base, *parts = spec.split(OPTION_SEP)
    options: dict[str, bool | int | float | str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not (key and eq and value):
            raise ValueError(f"policy {spec!r}: option {part!r} is not key=value")
        if key in options:
            raise ValueError(f"policy {spec!r}: option {key!r} is given twice")
        options[key] = _option_value(value)
    return base, options


def canonical_policy(spec: str) -> str:
    """The current name of ``spec``: a former name (``ALIASES``) resolved, anything else unchanged.

    Silent, for names read back from old logs and run folders; ``policy_factory`` warns on a former name.
    """
    return ALIASES.get(spec, spec)


def is_privileged(spec: str) -> bool:
    """Whether the policy ``spec`` (current or former name, options allowed) reads the simulator's hidden state."""
    return canonical_policy(spec.split(OPTION_SEP)[0]) in PRIVILEGED


def policy_label(spec: str) -> str:
    """The name tables and charts show: ``spec``, marked ``(reference)`` for a privileged policy."""
    return f"{spec} (reference)" if is_privileged(spec) else spec


def policy_factory(spec: str) -> PolicyFactory:
    """The factory of a policy name (``random``) or ``NAME:ARG`` spec (``gpr:runs/hepo/RUN``), options
    (``@key=value``, ``split_spec``) bound.

    Checks the spec without building anything, so a command line fails on its arguments before it runs.
    A former name (``ALIASES``) gives its current policy's factory with a ``FutureWarning``.

    Raises:
        ValueError: an unknown name (listing ``known_policies()``), a family's bad ARG, or an option the
            policy does not take.
    """
    spec, options = split_spec(spec)
    factory = _base_factory(spec)
    if not options:
        return factory
    unknown = sorted(set(options) - set(_options(factory)))
    if unknown:
        raise ValueError(f"policy {spec!r} takes no option {unknown}: its options are {_options(factory)}")
    return functools.partial(factory, **options)


def _base_factory(spec: str) -> PolicyFactory:
    if spec in ALIASES:
        warnings.warn(f"policy {spec!r} is deprecated: use {ALIASES[spec]!r}", FutureWarning, stacklevel=2)
        spec = ALIASES[spec]
    family, sep, arg = spec.partition(":")
    if not sep and spec in POLICIES:
        return POLICIES[spec]
    if sep and family in FAMILIES and arg:
        return FAMILIES[family].factory(arg)
    raise ValueError(f"unknown policy {spec!r}: expected one of {', '.join(known_policies())}")


def policy_inputs(spec: str) -> list[Path]:
    """The files the policy ``spec`` reads (a family's run folder files); [] for the built-in policies."""
    family, sep, arg = split_spec(spec)[0].partition(":")
    return FAMILIES[family].inputs(arg) if sep and family in FAMILIES else []


def policy_options(spec: str) -> list[str]:
    """The options (keyword arguments beyond env and seed) the policy ``spec`` takes."""
    return _options(policy_factory(spec))


def _options(factory: PolicyFactory) -> list[str]:
    """The keyword options of ``factory`` (those a spec's ``@key=value`` already bound included)."""
    return [p for p in inspect.signature(factory).parameters if p not in ("env", "seed")]


def make_policy(spec: str, env, seed: int = 0, **options) -> Policy:
    """Build the policy ``spec`` (a name or ``NAME:ARG``, ``known_policies()``) bound to ``env``.

    Args:
        spec: e.g. ``"cascade-privileged"``, ``"oracle-fatigue"``, ``"gpr:runs/hepo/RUN"``,
            ``"cascade-privileged@temperature=0"`` (options in the spec, ``split_spec``).
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
    twice = sorted(set(options) & set(split_spec(spec)[1]))
    if twice:
        raise ValueError(f"policy {spec!r} already sets {twice} in its spec: pass each option once")
    return factory(env, seed, **options)


__all__ = [
    "ALIASES",
    "FAMILIES",
    "POLICIES",
    "PRIVILEGED",
    "Family",
    "Policy",
    "PolicyFactory",
    "PolicyOutput",
    "batched_env",
    "canonical_policy",
    "is_privileged",
    "known_policies",
    "make_policy",
    "policy_factory",
    "policy_inputs",
    "policy_label",
    "policy_options",
    "row_chunks",
    "catalog_rows",
    "CATALOG_CELLS",
    "split_spec",
]
