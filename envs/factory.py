"""One way to build the batched env: ``make_vec_env(env_id, num_envs, ...)``.

Every learner, evaluator and benchmark builds its vector env here, so the Gymnasium call (and its
``vectorization_mode``) and the error for an unknown id live in one place.
"""

from __future__ import annotations

import gymnasium
import torch
from gymnasium.envs.registration import registry

from envs.ads import AdsVectorEnv
from gpr_sim.world import WorldConfig

VECTOR_ENTRY_POINT = "envs.ads:AdsVectorEnv"


def ads_env_ids() -> list[str]:
    """The registered Gymnasium ids whose vector env is ``AdsVectorEnv`` (``import envs`` registers ads-v0)."""
    return sorted(
        i for i, spec in registry.items() if spec.vector_entry_point in (VECTOR_ENTRY_POINT, AdsVectorEnv)
    )


def make_vec_env(
    env_id: str,
    num_envs: int,
    *,
    preset: str | None = None,
    config: WorldConfig | dict | None = None,
    world_seed: int = 0,
    device: str | torch.device = "cpu",
    validate_actions: bool = True,
    **kwargs,
) -> AdsVectorEnv:
    """``num_envs`` sessions of one market: ``gymnasium.make_vec(env_id, vectorization_mode="vector_entry_point")``.

    Args:
        env_id: a registered ads env id (``ads_env_ids()``), e.g. ``"ads-v0"``.
        num_envs: N, concurrent sessions sharing the advertisers' budgets.
        preset: world preset; None keeps the env's default ("small") unless ``config`` is given.
        config: a ``WorldConfig`` (or its dict) instead of the preset.
        world_seed: seed of the static world (catalog, advertisers, users).
        device: torch device of the simulation.
        validate_actions: range-check actions (one host sync per step on a GPU).
        **kwargs: the env's other arguments (``envs.ads`` module doc): ``action_mode``, ``tokenizer``,
            ``market_envs``, ``grant``, ``first_slot``, or ``WorldConfig`` fields.

    Raises:
        ValueError: naming ``env_id`` and the registered ads ids, if it is not one of them.
    """
    known = ads_env_ids()
    if env_id not in known:
        raise ValueError(f"env_id={env_id!r} is not a registered ads env: expected one of {known}")
    if preset is not None:
        kwargs["preset"] = preset
    if config is not None:
        kwargs["config"] = config
    return gymnasium.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        world_seed=world_seed,
        device=device,
        validate_actions=validate_actions,
        **kwargs,
    )
