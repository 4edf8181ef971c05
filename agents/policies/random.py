"""``random``: K ads uniformly at random (a floor)."""

from __future__ import annotations

import torch

from agents.policies import PolicyOutput, batched_env


class RandomPolicy:
    """Proposes K ads uniformly at random (with replacement)."""

    def __init__(self, env, seed: int = 0):
        self.env = batched_env(env)
        self.generator = torch.Generator(device=self.env.device).manual_seed(seed)

    def act(self, obs: dict[str, torch.Tensor]) -> PolicyOutput:
        cfg = self.env.config
        n, k = obs["user_id"].shape[0], cfg.num_candidates
        action = torch.randint(0, cfg.num_ads, (n, k), generator=self.generator, device=self.env.device)
        prop = torch.full((n,), float(cfg.num_ads) ** -k, dtype=torch.float64, device=self.env.device)
        return PolicyOutput(action, prop)
