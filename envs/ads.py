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
`action_mode="ad"` (default): `num_candidates` ad indices: `Discrete(num_ads)` when `num_candidates == 1`,
else `MultiDiscrete([num_ads] * num_candidates)`. Repeated ids compete once. An action of the wrong
shape, dtype or range raises `ValueError` before anything moves.

`action_mode="semantic"` (needs `tokenizer=`): each candidate is a semantic-ID path, one digit per level
(`gpr_sim.tokenizer.world.WorldTokenizer`, L' = L quantiser levels + 1 disambiguation digit):

| num_candidates | single env | vector env |
|---|---|---|
| 1 | `MultiDiscrete(level_sizes)`, shape (L',) | (N, L') or (N, 1, L') |
| K > 1 | `MultiDiscrete`, shape (K, L') | (N, K, L') |

A path maps to its ad through the tokenizer's `SemanticIdTable`. A path that names no item, or names an
organic item, is invalid: it shows nothing, does not crash, and is counted in `info["invalid"]`. A digit
outside its level's range `[0, level_sizes[l])` raises `ValueError`, like a bad ad index.

## Reward
`reward.revenue x price + reward.gmv x GMV + reward.click x clicks + reward.conversion x conversions
+ reward.stay x [user stays]` (`gpr_sim.world.config.RewardConfig`; default revenue + 0.02 GMV).

## Episode end
`terminated`: the user left (probability rises with fatigue). `truncated`: `max_steps` requests.
The vector env autoresets in the same step (`AutoresetMode.SAME_STEP`): the returned observation
of a finished row is its new session's first; `info["final_obs"]` holds the last one.

## Info (per step; vector env: leading dim N; per-slot keys have a trailing slot dim S)
per slot: `ad_id` (an ad index, in either action mode), `advertiser_id` (-1 = empty slot),
`impression`, `click`, `conversion`, `gmv`, `revenue` (price charged), `p_click`, `p_conversion` (true
probabilities of the shown ad), `ecpm` (auction eCPM, platform estimate), `ecpm_true`, `match`,
`is_new_ad`; per request: `invalid` (candidates that name no ad: unknown or organic semantic IDs), `budget_capped`, `delayed_conversion`, `delayed_gmv`, `reward`, `activity_tier`, `user_id`,
`episode_return` and `episode_length` (the finished session's totals where it ended).

## Arguments
`preset` ("small" | "large"), `config` (a `WorldConfig` or dict), any `WorldConfig` field as a
keyword (e.g. `num_ads=1000`), `world_seed`, `action_mode` ("ad" | "semantic"), `tokenizer` (a
`WorldTokenizer`, a `SemanticIdTable`, or the folder `python -m agents.tokenize` wrote; it must have
been fitted on this world, checked by fingerprint), and for the vector env `num_envs`, `device`,
`validate_actions` (range check; costs one host sync per step on a GPU), and for a data-parallel
shard of a larger market `market_envs` (the sessions budgets are scaled to), `grant` (how a step's
charges are settled) and `first_slot` (`envs.market.BatchedMarket`). `envs.make_vec_env(env_id,
num_envs, ...)` builds the vector env.

## Seeding
`reset(seed=s)`: `s` is None (continue the sessions' streams; the first reset uses 0) or an integer >= 0.
The sessions' random streams are keyed by `s mod 2**32` (the counter-based RNG's keys are 32-bit:
`gpr_sim.world.rng`), so seeds equal modulo 2**32 give the same sessions; larger seeds are reduced,
as Gymnasium's own `np_random` seeding accepts them. A negative or non-integer seed raises `ValueError`.
`step`, `score` and the other reads before the first `reset` raise `RuntimeError("call reset() before
step()")` (naming the call).

## Scoring API
`env.unwrapped.score(candidates, truth=False, estimator=None)`: expected value of arbitrary candidate ads
for the current requests without moving the world. `estimator` picks the funnel probabilities it is
computed from (`envs.market.ESTIMATORS`): "learned" (the platform's pCTR/pCVR trained on logs,
`gpr_sim.platform.funnel`, given by `env.unwrapped.attach_platform(model)`; reads only the observation
and the catalog), "privileged" (the simulator's own form on the hidden interest and quality, plus per-ad
noise: the market's auction-time model) or "truth" (the hidden true funnel, for oracle studies; the same
as `truth=True`). The default, `env.unwrapped.estimator`, is "learned" once a model is attached and
"privileged" before; "learned" with no model attached, an unknown name or `truth=True` with another
estimator raise `ValueError`. Whatever the estimator, realised outcomes come from the truth.

The auction inside `step` ranks on the privileged estimate by default (`env.unwrapped.auction_estimator`
"privileged"); `env.unwrapped.attach_auction(model)` makes it rank on a learned pCTR/pCVR model instead
("learned"; evaluated on the platform view by the same code as the "learned" estimator; None goes back), as
a production auction ranks on the production models. While it is attached, every estimator's P(win) and
price are the auction's own, so the scoring API predicts the auction `step` runs. `env.unwrapped.catalog`
is the platform view of the world (`gpr_sim.platform.Catalog`). Candidates are integer ad indices in [0, num_ads), or -1 for "no ad", which scores -inf value;
floats or bools (which would be truncated to other ads) raise `ValueError`, and so do ids >= num_ads or
< -1 (in the vector env when `validate_actions`, the range check's one host sync). Semantic-ID paths that
name no ad decode to -1. `env.unwrapped.eligible_ads()`: the mask of ads whose advertiser can bid now.
With a tokenizer: `env.unwrapped.prefix_mask(prefixes)` gives, for prefixes (..., l), the (..., K_l)
mask of next digits that lead to an eligible ad (the trie over ads, restricted by `eligible_ads()`;
for constrained decoding), and `env.unwrapped.semantic_ids(ads)` the (..., L') paths of ad indices.

## What learners read (vector env)
The env owns its state; learners use these instead of reaching into the engine:
`world` (the static world: catalog, users, `world.config`), `config`, `num_envs`, `device`,
`first_slot` (global slot of row 0), `state` (the current sessions, hidden state included: only the
oracles, logging and rollouts read it), `observe()`, `remaining_budget()` (per advertiser, this budget
day), `market_features()` (the platform's spend ledger summarised for the E token, `gpr_sim.platform.market`;
the single env has it too), `score(candidates, truth, state=, estimator=)` (also for some rows or rehearsed requests),
`catalog`, `estimator`, `attach_platform(model)`, `auction_estimator` and `attach_auction(model)` (Scoring API),
`rehearse(rows)` (the next request of chosen sessions with no ad shown, on its own random stream; moves
nothing), and `state_dict()` / `load_state_dict()` (resume bit for bit).

## Version history
- v0: first release; semantic-ID action mode (`action_mode="semantic"`), default unchanged; the scoring
  API's `estimator` and `attach_platform` (default unchanged until a model is attached); `attach_auction`
  (the auction on a learned model; default unchanged: the privileged auction); `market_features()` (the
  platform's spend ledger for the E token; observations unchanged).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.market import (
    REHEARSAL_SEED_OFFSET,
    BatchedMarket,
    Rehearsal,
    check_seed,
    outcome_info,
    resolve_config,
)
from gpr_sim.platform import Catalog, FunnelModel
from gpr_sim.tokenizer.world import WorldTokenizer, as_world_tokenizer
from gpr_sim.world import CONTEXT_DIM, CandidateScores, SessionState, World, WorldConfig
from gpr_sim.world.catalog import USER_FEATURE_DIM
from gpr_sim.world.core import Grant


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


ACTION_MODES = ("ad", "semantic")


def action_space(cfg: WorldConfig, level_sizes: tuple[int, ...] | None = None) -> spaces.Space:
    """The single-session action space: candidate ad indices, or semantic-ID paths given ``level_sizes``."""
    k = cfg.num_candidates
    if level_sizes is not None:  # one digit per level, per candidate
        nvec = np.asarray(level_sizes, dtype=np.int64)
        return spaces.MultiDiscrete(nvec if k == 1 else np.tile(nvec, (k, 1)))
    if k == 1:
        return spaces.Discrete(cfg.num_ads)
    return spaces.MultiDiscrete(np.full(k, cfg.num_ads, dtype=np.int64))


def check_candidates(
    action: torch.Tensor, num_envs: int, cfg: WorldConfig, check_range: bool
) -> torch.Tensor:
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
            raise ValueError(
                f"action contains ad index {lo if lo < 0 else hi}: expected ids in [0, {cfg.num_ads - 1}]"
            )
    return action


def check_score_candidates(candidates: torch.Tensor, cfg: WorldConfig, check_range: bool) -> torch.Tensor:
    """Validate ``score``'s candidate ads (any shape) and return them as int64.

    -1 ("no ad") is allowed and scores -inf value; other ids outside [0, num_ads) raise when ``check_range``
    (one host sync on a GPU).

    Raises:
        ValueError: naming ``candidates``, for a float, bool or complex dtype (a float would be truncated to
            another ad) or an id outside [-1, num_ads).
    """
    if candidates.dtype.is_floating_point or candidates.dtype == torch.bool or candidates.is_complex():
        raise ValueError(
            f"candidates dtype {candidates.dtype} is invalid: expected integer ad indices (int64)"
        )
    candidates = candidates.long()
    if check_range and candidates.numel():
        lo, hi = int(candidates.min()), int(candidates.max())
        if lo < -1 or hi >= cfg.num_ads:
            raise ValueError(
                f"candidates contain ad index {lo if lo < -1 else hi}: expected ids in [0, {cfg.num_ads - 1}] "
                f"or -1 (no ad)"
            )
    return candidates


def check_semantic_ids(
    action: torch.Tensor, num_envs: int, num_candidates: int, level_sizes: tuple[int, ...], check_range: bool
) -> torch.Tensor:
    """Validate batched semantic-ID actions and return them as (N, K, L') int64.

    Unknown paths pass (they become invalid candidates); digits outside a level's range raise
    ``ValueError`` when ``check_range`` (one host sync).
    """
    k, depth = num_candidates, len(level_sizes)
    if action.dtype.is_floating_point or action.dtype == torch.bool or action.is_complex():
        raise ValueError(f"action dtype {action.dtype} is invalid: expected integer semantic-ID digits")
    if k == 1 and action.shape == (num_envs, depth):
        action = action[:, None]
    if action.shape != (num_envs, k, depth):
        want = (
            f"({num_envs}, {depth}) or ({num_envs}, 1, {depth})" if k == 1 else f"({num_envs}, {k}, {depth})"
        )
        raise ValueError(f"action shape {tuple(action.shape)} is invalid: expected {want} semantic-ID digits")
    action = action.long()
    if check_range:
        sizes = torch.tensor(level_sizes, device=action.device)
        bad = (action < 0) | (action >= sizes)  # (N, K, L')
        if bool(bad.any()):
            level = int(torch.nonzero(bad)[0, 2])
            digit = int(action[bad][0])
            raise ValueError(
                f"action digit {digit} at level {level} is out of range: expected codes in "
                f"[0, {level_sizes[level] - 1}] (level_sizes {tuple(level_sizes)})"
            )
    return action


def resolve_tokenizer(action_mode: str, tokenizer, engine: BatchedMarket) -> WorldTokenizer | None:
    """The env's tokenizer on its device, checked against its world; None in ad mode without one."""
    if action_mode not in ACTION_MODES:
        raise ValueError(f"action_mode={action_mode!r} is not allowed: expected one of {ACTION_MODES}")
    if tokenizer is None:
        if action_mode == "semantic":
            raise ValueError("action_mode='semantic' needs tokenizer= (a WorldTokenizer or a saved folder)")
        return None
    tok = as_world_tokenizer(tokenizer)
    tok.check_world(engine.world)
    return tok.to(engine.device)


def _require_tokenizer(tokenizer: WorldTokenizer | None) -> WorldTokenizer:
    if tokenizer is None:
        raise ValueError(
            "this env has no tokenizer: pass tokenizer= (and action_mode='semantic' for ID actions)"
        )
    return tokenizer


def to_candidates(
    action: torch.Tensor, num_envs: int, cfg: WorldConfig, tokenizer: WorldTokenizer | None, check_range: bool
) -> torch.Tensor:
    """A batched action in either mode -> (N, K) int64 ad ids (-1 = a semantic ID that names no ad)."""
    if tokenizer is None:
        return check_candidates(action, num_envs, cfg, check_range)
    paths = check_semantic_ids(action, num_envs, cfg.num_candidates, tokenizer.level_sizes, check_range)
    return tokenizer.ads_of(paths)  # (N, K)


def _extra_info(engine: BatchedMarket, user_id: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"user_id": user_id, "activity_tier": engine.world.user_activity[user_id]}


class _PlatformModels:
    """The platform's learned models on an env, read and attached through its ``engine`` (``BatchedMarket``):
    one home for the single and the vector env."""

    engine: BatchedMarket

    @property
    def catalog(self) -> Catalog:
        """The platform view of the world (``gpr_sim.platform.Catalog``), on the env's device."""
        return self.engine.catalog

    @property
    def estimator(self) -> str:
        """What ``score`` answers with by default: "learned" with a model attached, else "privileged"."""
        return self.engine.estimator

    def attach_platform(self, model: FunnelModel | None) -> None:
        """Score with a learned pCTR/pCVR model by default (``BatchedMarket.attach_platform``); None detaches."""
        self.engine.attach_platform(model)

    @property
    def auction_estimator(self) -> str:
        """What the auction inside ``step`` ranks on: "learned" after ``attach_auction(model)``, else "privileged"."""
        return self.engine.auction_estimator

    def attach_auction(self, model: FunnelModel | None) -> None:
        """Rank the auction on a learned pCTR/pCVR model (``BatchedMarket.attach_auction``); None: privileged."""
        self.engine.attach_auction(model)


class AdsEnv(_PlatformModels, gym.Env):
    """One user session of the marketplace (numpy in, numpy out). See the module docstring."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        preset: str = "small",
        config: WorldConfig | dict | None = None,
        world_seed: int = 0,
        action_mode: str = "ad",
        tokenizer=None,
        **overrides,
    ):
        cfg = resolve_config(preset, config, **overrides)
        self.engine = BatchedMarket(cfg, num_envs=1, world_seed=world_seed, device="cpu")
        self.config = cfg
        self.action_mode = action_mode
        self.tokenizer = resolve_tokenizer(action_mode, tokenizer, self.engine)
        self._decoder = self.tokenizer if action_mode == "semantic" else None  # turns actions into ads
        self.observation_space = observation_space(cfg)
        self.action_space = action_space(cfg, None if self._decoder is None else self._decoder.level_sizes)

    @property
    def world(self) -> World:
        """The static world (catalog, advertisers, users; ``world.config``), on the CPU."""
        return self.engine.world

    def _obs(self, obs: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = {k: v[0].numpy().copy() for k, v in obs.items()}
        out["user_id"] = np.int64(out["user_id"])
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        check_seed(seed)  # before Gymnasium's np_random: one error for a bad seed (module doc, Seeding)
        super().reset(seed=None if seed is None else int(seed))  # np_random takes Python ints only
        obs = self.engine.reset(seed=seed)
        return self._obs(obs), {}

    def step(self, action):
        self.engine.require_reset("step()")
        arr = np.asarray(action)
        if arr.dtype.kind not in "iu":
            what = "ad indices" if self._decoder is None else "semantic-ID digits"
            raise ValueError(f"action dtype {arr.dtype} is invalid: expected integer {what}")
        t = torch.as_tensor(arr)
        if self._decoder is None:
            t = t.reshape(1, -1) if arr.ndim <= 1 else t
        else:
            t = t[None]  # (L',) or (K, L') -> a batch of one
        cand = to_candidates(t, 1, self.config, self._decoder, check_range=True)
        user_id = self.engine.state.user_id
        _, out, final_obs, ep_ret, ep_len = self.engine.step(cand, autoreset=False)
        info = {k: v[0].numpy().copy() for k, v in outcome_info(out).items()}
        info.update({k: v[0].numpy().copy() for k, v in _extra_info(self.engine, user_id).items()})
        info["episode_return"], info["episode_length"] = float(ep_ret[0]), int(ep_len[0])
        return (
            self._obs(final_obs),
            float(out.reward[0]),
            bool(out.terminated[0]),
            bool(out.truncated[0]),
            info,
        )

    def score(self, candidates, truth: bool = False, estimator: str | None = None) -> dict[str, np.ndarray]:
        """Expected value of candidate ads (K,) for the current request; moves nothing (module doc, Scoring API)."""
        arr = np.asarray(candidates)
        if arr.dtype.kind not in "iu":  # numpy's name for the dtype, as ``step`` reports it
            raise ValueError(f"candidates dtype {arr.dtype} is invalid: expected integer ad indices (int64)")
        cand = check_score_candidates(torch.as_tensor(arr), self.config, check_range=True)
        self.engine.require_reset("score()")
        cand = cand.reshape(1, -1)
        scores = self.engine.score(cand, truth, estimator=estimator)
        return {k: v[0].numpy() for k, v in scores._asdict().items()}

    def eligible_ads(self) -> np.ndarray:
        return self.engine.eligible_ads().numpy()

    def market_features(self) -> np.ndarray:
        """(F_m,) float32 the platform's ledger of the next auction (``gpr_sim.platform.market``)."""
        return self.engine.market_features().numpy()

    def prefix_mask(self, prefixes, eligible_only: bool = True) -> np.ndarray:
        """(..., l) semantic-ID prefixes -> (..., K_l) bool: digits that lead to an (eligible) ad."""
        tok = _require_tokenizer(self.tokenizer)
        elig = self.engine.eligible_ads() if eligible_only else None
        return tok.prefix_mask(torch.as_tensor(np.asarray(prefixes, dtype=np.int64)), elig).numpy()

    def semantic_ids(self, ads) -> np.ndarray:
        """(...) ad indices -> (..., L') semantic-ID paths (a valid semantic action for those ads)."""
        tok = _require_tokenizer(self.tokenizer)
        return tok.paths_of_ads(torch.as_tensor(np.asarray(ads, dtype=np.int64))).numpy()


class AdsVectorEnv(_PlatformModels, gym.vector.VectorEnv):
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
        action_mode: str = "ad",
        tokenizer=None,
        market_envs: int | None = None,
        grant: Grant | None = None,
        first_slot: int = 0,
        **overrides,
    ):
        cfg = resolve_config(preset, config, **overrides)
        self.engine = BatchedMarket(
            cfg,
            num_envs=num_envs,
            world_seed=world_seed,
            device=device,
            market_envs=market_envs,
            grant=grant,
            first_slot=first_slot,
        )
        self.config = cfg
        self.num_envs = num_envs
        self.device = self.engine.device
        self.validate_actions = validate_actions
        self.action_mode = action_mode
        self.tokenizer = resolve_tokenizer(action_mode, tokenizer, self.engine)
        self._decoder = self.tokenizer if action_mode == "semantic" else None
        self.single_observation_space = observation_space(cfg)
        self.single_action_space = action_space(
            cfg, None if self._decoder is None else self._decoder.level_sizes
        )
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # one int for every row (rows are keyed by their slot index); checked in BatchedMarket.reset
        return self.engine.reset(seed=seed), {}

    def step(self, actions):
        self.engine.require_reset("step()")
        actions = torch.as_tensor(actions, device=self.device)
        cand = to_candidates(actions, self.num_envs, self.config, self._decoder, self.validate_actions)
        user_id = self.engine.state.user_id
        obs, out, final_obs, ep_ret, ep_len = self.engine.step(cand, autoreset=True)
        done = out.terminated | out.truncated
        info = outcome_info(out)
        info.update(_extra_info(self.engine, user_id))
        info.update(episode_return=ep_ret, episode_length=ep_len, final_obs=final_obs, _final_obs=done)
        return obs, out.reward, out.terminated, out.truncated, info

    # -- what learners read: the env owns its state (module doc) ----------------------------------------
    @property
    def world(self) -> World:
        """The static world (catalog, advertisers, users; ``world.config``) on the env's device."""
        return self.engine.world

    @property
    def state(self) -> SessionState:
        """The current sessions, (N, ...) per field, hidden state included (oracles, logging, rollouts)."""
        if self.engine.state is None:
            raise RuntimeError("call reset() before reading the state")
        return self.engine.state

    @property
    def first_slot(self) -> int:
        """Global slot index of row 0 (a data-parallel shard's first row)."""
        return self.engine.first_slot

    def observe(self) -> dict[str, torch.Tensor]:
        """The observation of the current requests (what the last ``reset`` or ``step`` returned)."""
        return self.engine.observe()

    def score(
        self,
        candidates: torch.Tensor,
        truth: bool = False,
        state: SessionState | None = None,
        estimator: str | None = None,
    ) -> CandidateScores:
        """Expected value of candidate ads (N, K) for the current requests; moves nothing.

        ``state``: value them for these sessions instead (``self.state.select(rows)``, or ``rehearse(rows).state``).
        ``estimator``: "learned", "privileged" or "truth" (module doc, Scoring API); default ``self.estimator``.
        """
        cand = check_score_candidates(
            torch.as_tensor(candidates, device=self.device), self.config, self.validate_actions
        )
        return self.engine.score(cand, truth, state, estimator)

    def eligible_ads(self) -> torch.Tensor:
        """(num_ads,) bool: ads whose advertiser can bid in the next auction."""
        return self.engine.eligible_ads()

    def remaining_budget(self) -> torch.Tensor:
        """(num_advertisers,) float64: what each advertiser can still spend in the current budget day."""
        return self.engine.remaining_budget()

    def market_features(self) -> torch.Tensor:
        """(F_m,) float32 the platform's ledger of the next auction, the same for every current request
        (``gpr_sim.platform.market``: the E token's market columns)."""
        return self.engine.market_features()

    def rehearse(self, rows: torch.Tensor, seed_offset: int = REHEARSAL_SEED_OFFSET) -> Rehearsal:
        """The next request of sessions ``rows`` (R,) with no ad shown now, on its own random stream; moves
        nothing (``BatchedMarket.rehearse``)."""
        return self.engine.rehearse(torch.as_tensor(rows, device=self.device).long(), seed_offset)

    def state_dict(self) -> dict:
        """Sessions, market and episode totals (copies); ``load_state_dict`` resumes them bit for bit."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def prefix_mask(self, prefixes, eligible_only: bool = True) -> torch.Tensor:
        """(..., l) semantic-ID prefixes (e.g. (N, l) or (N, beams, l)) -> (..., K_l) bool legal next digits."""
        tok = _require_tokenizer(self.tokenizer)
        elig = self.engine.eligible_ads() if eligible_only else None
        return tok.prefix_mask(torch.as_tensor(prefixes, device=self.device), elig)

    def semantic_ids(self, ads) -> torch.Tensor:
        """(...) ad indices -> (..., L') semantic-ID paths."""
        tok = _require_tokenizer(self.tokenizer)
        return tok.paths_of_ads(torch.as_tensor(ads, device=self.device).long())
