"""``learned-cascade:PATH``: a multi-stage ad system built as in production, from logged data, on the platform view.

Two-tower retrieval (top R by dot product over the eligible catalog) -> a tiny pre-ranker distilled from the
ranker's eCPM (top P) -> the learned funnel's expected value through the env's scoring API
(``score(..., estimator="learned")``, the one home of the value formula) -> softmax exploration over log
value (Plackett-Luce over K candidates, exact propensities; temperature 0 = greedy, propensity 1).

Every stage is a model of the platform folder PATH (``agents.platform.folder``), each trained on its own
objective (clicks, eCPM distillation, pCTR/pCVR), so misalignment between stages and the errors one passes
to the next come from the models, not from a shared oracle. The policy reads only the platform view:
``env.catalog``, the observation, ``env.eligible_ads()``, ``env.config.num_candidates`` (the action's
width) and the learned scoring API; never the world's hidden fields or the session state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from agents.platform.folder import Platform, check_platform_folder, load_platform, platform_inputs
from agents.policies import PolicyOutput, batched_env
from agents.policies.cascade import explore
from gpr_sim.platform.preranking import preranking_features
from gpr_sim.world.config import check_range

LEARNED = "learned"
"""the scoring API's estimator of the platform's learned funnel"""


@dataclass(frozen=True)
class LearnedCascadeConfig:
    """Stage sizes and exploration of the learned cascade (the same sizes as ``cascade``'s, so the two compare)."""

    retrieval_size: int = 100
    """R, ads kept by retrieval"""
    preranking_size: int = 20
    """P, ads kept by pre-ranking (the ranker scores only these)"""
    temperature: float = 0.3
    """softmax exploration over log learned value; 0 = greedy (propensity 1)"""

    def __post_init__(self) -> None:
        for name in ("retrieval_size", "preranking_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
            check_range(name, value, 1, 1 << 20)
        check_range("temperature", self.temperature, 0.0, 100.0)


class Stages(NamedTuple):
    """What each stage kept for N requests."""

    retrieved: torch.Tensor  # (N, R) int64 retrieval's ads, best first
    preranked: torch.Tensor  # (N, P) int64 pre-ranking's ads, best first (the ranked pool)
    logits: (
        torch.Tensor
    )  # (N, P) log learned value of the pool (ineligible: log 1e-12), before the temperature


class LearnedCascadePolicy:
    """Retrieval -> pre-ranking -> learned-funnel ranking -> Plackett-Luce exploration over K candidates.

    Binds to ``env``: attaches the platform's funnel to it (``env.attach_platform``) so the env's learned
    scoring answers with this platform's ranker.
    """

    def __init__(self, env, platform: Platform, config: LearnedCascadeConfig | None = None, seed: int = 0):
        self.env = batched_env(env)
        self.config = config or LearnedCascadeConfig()
        dev = self.env.device
        self.platform = Platform(*(m.to(dev).eval() for m in platform))
        self.env.attach_platform(self.platform.funnel)
        self.generator = torch.Generator(device=dev).manual_seed(seed)

    @torch.no_grad()
    def stages(self, obs: dict[str, torch.Tensor]) -> Stages:
        """Run the three stages on the N requests of ``obs`` (module doc).

        P = max(min(preranking_size, R), num_candidates) with R = min(retrieval_size, num_ads), so the pool
        always holds the K candidates.
        """
        cfg, catalog = self.config, self.env.catalog
        eligible = self.env.eligible_ads()
        r = min(cfg.retrieval_size, catalog.num_ads)
        p = min(max(min(cfg.preranking_size, r), self.env.config.num_candidates), r)
        retrieved, scores = self.platform.retrieval.retrieve(catalog, obs, r, eligible)
        features = preranking_features(catalog, obs, retrieved, scores)
        preranked = self.platform.preranking.keep(retrieved, features, p, eligible)
        value = self.env.score(preranked, estimator=LEARNED).value
        value = value.masked_fill(~eligible[preranked], 0.0)
        return Stages(retrieved, preranked, torch.log(value.clamp(min=1e-12)))

    def pool(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool, logits), (N, P) each: the ranked pool ``act`` samples from and its log learned value."""
        s = self.stages(obs)
        return s.preranked, s.logits

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        pool, logits = self.pool(obs)
        return explore(pool, logits, self.env.config.num_candidates, self.config.temperature, self.generator)


def learned_cascade_factory(path: str):
    """The registry's ``learned-cascade`` family: ``learned-cascade:PATH`` -> ``factory(env, seed, temperature)``.

    The folder is checked here (every model file present), so a command line fails on its arguments
    before any env exists; the models are read (and checked) by the factory.
    """
    folder = check_platform_folder(path)

    def factory(env, seed: int = 0, temperature: float | None = None) -> LearnedCascadePolicy:
        """``temperature``: softmax exploration over log learned value (None = ``LearnedCascadeConfig``'s, 0 = greedy)."""
        cfg = LearnedCascadeConfig() if temperature is None else LearnedCascadeConfig(temperature=temperature)
        return LearnedCascadePolicy(env, load_platform(folder, batched_env(env).device), cfg, seed=seed)

    return factory


def learned_cascade_inputs(path: str) -> list[Path]:
    """The files a ``learned-cascade:PATH`` policy reads."""
    return platform_inputs(path)


__all__ = [
    "LEARNED",
    "LearnedCascadeConfig",
    "LearnedCascadePolicy",
    "Stages",
    "learned_cascade_factory",
    "learned_cascade_inputs",
]
