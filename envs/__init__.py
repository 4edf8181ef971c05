"""Gymnasium registration of the marketplace: ``import envs`` makes ``ads-v0`` available.

gymnasium.make("ads-v0")                                   # one session, numpy
envs.make_vec_env("ads-v0", num_envs=4096, device="cuda")  # 4096 sessions, torch on the GPU
                                                           # (gymnasium.make_vec, vector_entry_point)
"""

from gymnasium.envs.registration import register, registry

from envs.ads import AdsEnv, AdsVectorEnv
from envs.factory import ads_env_ids, make_vec_env
from envs.market import BatchedMarket, Rehearsal, resolve_config

ENV_ID = "ads-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.ads:AdsEnv", vector_entry_point="envs.ads:AdsVectorEnv")

__all__ = [
    "ENV_ID",
    "AdsEnv",
    "AdsVectorEnv",
    "BatchedMarket",
    "Rehearsal",
    "ads_env_ids",
    "make_vec_env",
    "resolve_config",
]
