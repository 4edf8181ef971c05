"""
# `ads-v0`: an advertising marketplace with a user, organic content, oCPM advertisers and a GSP auction

## Description
Each episode is one user session in a content feed. Every step is one ad request: the policy proposes
candidate ads; the auction ranks the eligible candidates by the platform's estimated eCPM
(`1000 x target CPA x pCTR_hat x pCVR_hat`) against a reserve and fills the slots; winners pay the
generalized second price per impression, charged to advertiser budgets shared by every session of the
market; the user may click, convert (order value = GMV) and tire of ads; between requests they consume
organic items, which moves their interests. Irrelevant or frequent ads raise fatigue, lower clicks and
make the user leave: revenue now costs value later.

`gymnasium.make("ads-v0")` is one session (numpy in and out); `gymnasium.make_vec("ads-v0",
num_envs=N, vectorization_mode="vector_entry_point", device="cuda")` is N sessions in one market (torch
tensors on the device in and out). Both are views of one batched core (`gpr_sim.world.core`).

## Observation space (Dict; vector env: batched, leading dim N)
| key | shape | dtype | token | meaning |
|---|---|---|---|---|
| `user_id` | () Discrete(num_users) | int64 | U | population index of the user |
| `user` | (7,) | float32 | U | age/5, gender, device one-hot (3), city tier/3, activity tier/5 |
| `organic` | (organic_history,) | int64 | O | organic item ids consumed, most recent last, -1 = padding |
| `context` | (8,) | float32 | E | feed position/100, sin/cos hour, ad load/10, session progress, device one-hot (3) |
| `ad_history` | (ad_history,) | int64 | I | ad ids shown, most recent last, -1 = padding |
| `ad_events` | (ad_history,) | int64 | I | deepest event: 0 pad, 1 impression, 2 click, 3 conversion |

## Action space
`num_candidates` ad indices: `Discrete(num_ads)` when `num_candidates == 1`, else
`MultiDiscrete([num_ads] * num_candidates)`. Repeated ids compete once. An action of the wrong
shape, dtype or range raises `ValueError` before anything moves.

## Reward
`reward.revenue x price + reward.gmv x GMV + reward.click x clicks + reward.conversion x conversions
+ reward.stay x [user stays]` (`gpr_sim.world.config.RewardConfig`; default revenue + 0.02 GMV).

## Episode end
`terminated`: the user left (probability rises with fatigue). `truncated`: `max_steps` requests.
The vector env autoresets in the same step (`AutoresetMode.SAME_STEP`): the returned observation
of a finished row is its new session's first; `info["final_obs"]` holds the last one.

## Info (per step; vector env: leading dim N; per-slot keys have a trailing slot dim S)
per slot: `ad_id`, `advertiser_id` (-1 = empty slot), `impression`, `click`, `conversion`, `gmv`,
`revenue` (price charged), `p_click`, `p_conversion` (true probabilities of the shown ad), `ecpm`
(auction eCPM, platform estimate), `ecpm_true`, `match`, `is_new_ad`; per request: `invalid`,
`budget_capped`, `delayed_conversion`, `delayed_gmv`, `reward`, `activity_tier`, `user_id`,
`episode_return` and `episode_length` (the finished session's totals where it ended).

## Arguments
`preset` ("small" | "large"), `config` (a `WorldConfig` or dict), any `WorldConfig` field as a
keyword (e.g. `num_ads=1000`), `world_seed`, and for the vector env `num_envs`, `device`,
`validate_actions` (range check; costs one host sync per step on a GPU).

## Scoring API
`env.unwrapped.score(candidates, truth=False)`: expected value of arbitrary candidate ads for the
current requests without moving the world (platform estimates by default; `truth=True` for oracle
studies). `env.unwrapped.eligible_ads()`: the mask of ads whose advertiser can bid now.

## Version history
- v0: first release.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.market import BatchedMarket, outcome_info, resolve_config
from gpr_sim.world import CONTEXT_DIM, WorldConfig
from gpr_sim.world.catalog import USER_FEATURE_DIM


def observation_space(cfg: WorldConfig) -> spaces.Dict:
    """The single-session observation space of a world."""
    ids = lambda n, hi: spaces.Box(-1, hi - 1, (n,), np.int64)  # noqa: E731
    return spaces.Dict(
        {
            "user_id": spaces.Discrete(cfg.num_users),
            "user": spaces.Box(0.0, 1.0, (USER_FEATURE_DIM,), np.float32),
            "organic": ids(cfg.organic_history, cfg.num_organic),
            "context": spaces.Box(-1.0, 1e4, (CONTEXT_DIM,), np.float32),
            "ad_history": ids(cfg.ad_history, cfg.num_ads),
            "ad_events": spaces.Box(0, 3, (cfg.ad_history,), np.int64),
        }
    )


def action_space(cfg: WorldConfig) -> spaces.Space:
    """The single-session action space: candidate ad indices."""
    if cfg.num_candidates == 1:
        return spaces.Discrete(cfg.num_ads)
    return spaces.MultiDiscrete(np.full(cfg.num_candidates, cfg.num_ads, dtype=np.int64))


def check_candidates(action: torch.Tensor, num_envs: int, cfg: WorldConfig, check_range: bool) -> torch.Tensor:
    """Validate a batched action and return it as (N, K) int64; raise ``ValueError`` saying what was expected."""
    k = cfg.num_candidates
    if action.dtype.is_floating_point or action.dtype == torch.bool or action.is_complex():
        raise ValueError(f"action dtype {action.dtype} is invalid: expected integer ad indices")
    if k == 1 and action.shape == (num_envs,):
        action = action[:, None]
    if action.shape != (num_envs, k):
        want = f"({num_envs},) or ({num_envs}, 1)" if k == 1 else f"({num_envs}, {k})"
        raise ValueError(f"action shape {tuple(action.shape)} is invalid: expected {want} ad indices")
    action = action.long()
    if check_range:
        lo, hi = int(action.min()), int(action.max())
        if lo < 0 or hi >= cfg.num_ads:
            raise ValueError(f"action contains ad index {lo if lo < 0 else hi}: expected ids in [0, {cfg.num_ads - 1}]")
    return action


def _extra_info(engine: BatchedMarket, user_id: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"user_id": user_id, "activity_tier": engine.world.user_activity[user_id]}


class AdsEnv(gym.Env):
    """One user session of the marketplace (numpy in, numpy out). See the module docstring."""

    metadata = {"render_modes": []}

    def __init__(self, preset: str = "small", config: WorldConfig | dict | None = None, world_seed: int = 0, **overrides):
        cfg = resolve_config(preset, config, **overrides)
        self.engine = BatchedMarket(cfg, num_envs=1, world_seed=world_seed, device="cpu")
        self.config = cfg
        self.observation_space = observation_space(cfg)
        self.action_space = action_space(cfg)

    def _obs(self, obs: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = {k: v[0].numpy().copy() for k, v in obs.items()}
        out["user_id"] = np.int64(out["user_id"])
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs = self.engine.reset(seed=seed)
        return self._obs(obs), {}

    def step(self, action):
        arr = np.asarray(action)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"action dtype {arr.dtype} is invalid: expected integer ad indices")
        cand = check_candidates(torch.as_tensor(arr).reshape(1, -1) if arr.ndim <= 1 else torch.as_tensor(arr),
                                1, self.config, check_range=True)
        user_id = self.engine.state.user_id
        _, out, final_obs, ep_ret, ep_len = self.engine.step(cand, autoreset=False)
        info = {k: v[0].numpy().copy() for k, v in outcome_info(out).items()}
        info.update({k: v[0].numpy().copy() for k, v in _extra_info(self.engine, user_id).items()})
        info["episode_return"], info["episode_length"] = float(ep_ret[0]), int(ep_len[0])
        return self._obs(final_obs), float(out.reward[0]), bool(out.terminated[0]), bool(out.truncated[0]), info

    def score(self, candidates, truth: bool = False) -> dict[str, np.ndarray]:
        """Expected value of candidate ads (K,) for the current request; moves nothing."""
        cand = torch.as_tensor(np.asarray(candidates, dtype=np.int64)).reshape(1, -1)
        return {k: v[0].numpy() for k, v in self.engine.score(cand, truth)._asdict().items()}

    def eligible_ads(self) -> np.ndarray:
        return self.engine.eligible_ads().numpy()


class AdsVectorEnv(gym.vector.VectorEnv):
    """N sessions in one market, batched on a torch device (tensors in, tensors out)."""

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        preset: str = "small",
        config: WorldConfig | dict | None = None,
        world_seed: int = 0,
        device: str | torch.device = "cpu",
        validate_actions: bool = True,
        **overrides,
    ):
        cfg = resolve_config(preset, config, **overrides)
        self.engine = BatchedMarket(cfg, num_envs=num_envs, world_seed=world_seed, device=device)
        self.config = cfg
        self.num_envs = num_envs
        self.device = self.engine.device
        self.validate_actions = validate_actions
        self.single_observation_space = observation_space(cfg)
        self.single_action_space = action_space(cfg)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid: expected one int (rows are keyed by their slot index)")
        return self.engine.reset(seed=seed), {}

    def step(self, actions):
        actions = torch.as_tensor(actions, device=self.device)
        cand = check_candidates(actions, self.num_envs, self.config, self.validate_actions)
        user_id = self.engine.state.user_id
        obs, out, final_obs, ep_ret, ep_len = self.engine.step(cand, autoreset=True)
        done = out.terminated | out.truncated
        info = outcome_info(out)
        info.update(_extra_info(self.engine, user_id))
        info.update(episode_return=ep_ret, episode_length=ep_len, final_obs=final_obs, _final_obs=done)
        return obs, out.reward, out.terminated, out.truncated, info

    def score(self, candidates: torch.Tensor, truth: bool = False):
        """Expected value of candidate ads (N, K) for the current requests; moves nothing."""
        return self.engine.score(torch.as_tensor(candidates, device=self.device).long(), truth)

    def eligible_ads(self) -> torch.Tensor:
        return self.engine.eligible_ads()
