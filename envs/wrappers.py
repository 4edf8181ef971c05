"""Wrappers for learners that want a flat feature vector instead of token ids.

``FlatFeatures`` turns the U/O/E/I dict observation into one float vector: the user profile, the
request context, and mean content embeddings of the organic history and of the ad history (clicked
ads weighted up). Content embeddings are the public item features of the world (the stand-in for
multimodal embeddings), so this is what a feature-based ranker would see. Raw ids as floats would
be meaningless to an MLP.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gpr_sim.world import CONTEXT_DIM
from gpr_sim.world.catalog import USER_FEATURE_DIM


class FlatFeatures(gym.ObservationWrapper):
    """Dict observation -> Box(float32) of size 7 + 8 + 3 x emb_dim (single ``AdsEnv`` only)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        world = env.unwrapped.world
        self._organic_emb = world.organic_emb.cpu().numpy()
        self._ad_emb = world.ad_emb.cpu().numpy()
        d = world.config.emb_dim
        size = USER_FEATURE_DIM + CONTEXT_DIM + 3 * d
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)

    @staticmethod
    def _mean(emb: np.ndarray, ids: np.ndarray, weight: np.ndarray) -> np.ndarray:
        w = weight * (ids >= 0)
        total = w.sum()
        if total == 0:
            return np.zeros(emb.shape[1], dtype=np.float32)
        return (emb[np.maximum(ids, 0)] * w[:, None]).sum(0) / total

    def observation(self, obs: dict) -> np.ndarray:
        ones = np.ones_like(obs["organic"], dtype=np.float32)
        events = obs["ad_events"].astype(np.float32)
        organic = self._mean(self._organic_emb, obs["organic"], ones)
        shown = self._mean(self._ad_emb, obs["ad_history"], np.ones_like(events))
        clicked = self._mean(self._ad_emb, obs["ad_history"], (events >= 2).astype(np.float32))
        return np.concatenate([obs["user"], obs["context"], organic, shown, clicked]).astype(np.float32)
