"""Gymnasium registration of the marketplace: ``import envs`` makes ``ads-v0`` available.

    gymnasium.make("ads-v0")                                   # one session, numpy
    gymnasium.make_vec("ads-v0", num_envs=4096,
                       vectorization_mode="vector_entry_point",
                       device="cuda")                          # 4096 sessions, torch on the GPU
"""

from gymnasium.envs.registration import register, registry

from envs.ads import AdsEnv, AdsVectorEnv
from envs.market import BatchedMarket, resolve_config

ENV_ID = "ads-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.ads:AdsEnv", vector_entry_point="envs.ads:AdsVectorEnv")

__all__ = ["ENV_ID", "AdsEnv", "AdsVectorEnv", "BatchedMarket", "resolve_config"]
