"""The engine both Gymnasium envs are views of: world + state + market on one device, autoreset.

``BatchedMarket`` owns the tensors and calls the pure core (``gpr_sim.world``). The single env is a
``BatchedMarket`` with one row and numpy at the boundary; the vector env is the same class at full
width with torch tensors at the boundary. There is no second implementation to drift.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from gpr_sim.platform import Catalog, FunnelModel, catalog_of
from gpr_sim.platform.market import market_features
from gpr_sim.world import (
    CandidateScores,
    MarketState,
    Outcome,
    SessionState,
    World,
    WorldConfig,
    eligible_ads,
    generate_world,
    initial,
    observe,
    open_market,
    preset,
    remaining_budget,
    score,
    transition,
)
from gpr_sim.world.core import Grant
from gpr_sim.world.funnel import Probabilities

INFO_KEYS_PER_SLOT = (
    "ad_id",
    "advertiser_id",
    "impression",
    "click",
    "conversion",
    "gmv",
    "revenue",
    "p_click",
    "p_conversion",
    "ecpm",
    "ecpm_true",
    "match",
    "is_new_ad",
)
INFO_KEYS_PER_REQUEST = ("invalid", "budget_capped", "delayed_conversion", "delayed_gmv")
REHEARSAL_SEED_OFFSET = 0x5EED_A44
"""added to a session's seed for its rehearsed step (``BatchedMarket.rehearse``), so rehearsal never peeks at the
real next draw"""


ESTIMATORS = ("learned", "privileged", "truth")
"""what ``BatchedMarket.score`` answers with: the attached learned pCTR/pCVR (``attach_platform``), the
privileged estimator (the simulator's own form on hidden fields; the auction's default model), or the hidden
truth"""


def resolve_estimator(truth: bool, estimator: str | None, default: str) -> str:
    """The estimator a ``score`` call asks for: ``estimator``, "truth" when ``truth``, else ``default``.

    Raises:
        ValueError: for a name outside ``ESTIMATORS``, or ``truth=True`` with another estimator.
    """
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not allowed: expected one of {ESTIMATORS} or None")
    if truth and estimator not in (None, "truth"):
        raise ValueError(f"truth=True conflicts with estimator={estimator!r}: pass one of them")
    return "truth" if truth else estimator or default


SEED_BITS = 32
"""the session streams are keyed by ``seed mod 2**SEED_BITS`` (``gpr_sim.world.rng.stream_keys`` masks keys to 32 bits)"""


def check_seed(seed) -> int | None:
    """A ``reset`` seed as the int the sessions are keyed by: ``seed mod 2**32``, or None.

    Any non-negative integer is accepted, as Gymnasium's ``np_random`` seeding accepts them; seeds equal
    modulo 2**32 give the same sessions (the counter-based RNG's keys are 32-bit), which is what the core
    did already for every seed up to 2**63. Reducing here keeps larger seeds from overflowing the int64
    seed tensor.

    Raises:
        ValueError: naming the seed, if it is not an integer (bools and floats included) or is negative.
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(
            f"seed={seed!r} is invalid: expected None or an integer >= 0 (one seed for every row)"
        )
    if seed < 0:
        raise ValueError(
            f"seed={seed!r} is invalid: expected an integer >= 0 (sessions use it modulo 2**{SEED_BITS})"
        )
    return int(seed) % (1 << SEED_BITS)


def resolve_config(
    preset_name: str = "small", config: WorldConfig | dict | None = None, **overrides
) -> WorldConfig:
    """Config from a preset name, an explicit config (or its dict) and field overrides, validated."""
    if config is None:
        cfg = preset(preset_name)
    elif isinstance(config, dict):
        cfg = WorldConfig.from_dict(config)
    elif isinstance(config, WorldConfig):
        cfg = config
    else:
        raise ValueError(f"config must be a WorldConfig, a dict or None, got {type(config).__name__}")
    if overrides:
        unknown = sorted(set(overrides) - set(cfg.to_dict()))
        if unknown:
            raise ValueError(f"unknown WorldConfig field(s): {unknown}")
        cfg = cfg.replace(**overrides)
    return cfg


class BatchedMarket:
    """N concurrent user sessions in one advertiser market, with same-step autoreset.

    Args:
        config: the world configuration.
        num_envs: N, concurrent sessions (they share advertiser budgets).
        world_seed: seed of the static world (catalog, users); sessions are seeded by ``reset``.
        device: torch device for all tensors.
        world: an already generated world to reuse (its config wins over ``config``).
        market_envs: sessions the advertiser budgets are scaled to (default ``num_envs``). A
            data-parallel shard of a global market passes the global N (``agents.rl.distributed.shard_market``).
        grant: how a step's charges are settled (``gpr_sim.world.core.Grant``; default: this batch alone).
        first_slot: global slot index of row 0 (a data-parallel shard's first row; ``reset`` can move it).
    """

    def __init__(
        self,
        config: WorldConfig,
        num_envs: int,
        world_seed: int = 0,
        device: str | torch.device = "cpu",
        world: World | None = None,
        market_envs: int | None = None,
        grant: Grant | None = None,
        first_slot: int = 0,
    ) -> None:
        if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} is out of range: expected an integer >= 1")
        market_envs = num_envs if market_envs is None else market_envs
        if not isinstance(market_envs, int) or isinstance(market_envs, bool) or market_envs < 1:
            raise ValueError(f"market_envs={market_envs!r} is out of range: expected an integer >= 1")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
        self.world = (
            world.to(self.device) if world is not None else generate_world(config, world_seed, self.device)
        )
        self.config = self.world.config
        self.num_envs = num_envs
        self.market_envs = market_envs
        self.grant = grant
        self.state = None
        self.market = None
        self.first_slot = int(
            first_slot
        )  # global index of row 0 (data-parallel shards key their streams by global slot)
        self.episode_return = torch.zeros(num_envs, dtype=torch.float64, device=self.device)
        self.episode_length = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.platform: FunnelModel | None = None
        self.auction_model: FunnelModel | None = None
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        """The platform view of the world (``gpr_sim.platform.catalog_of``; built once, shares the tensors)."""
        if self._catalog is None:
            self._catalog = catalog_of(self.world)
        return self._catalog

    @property
    def estimator(self) -> str:
        """What ``score`` answers with by default: "learned" with a model attached, else "privileged"."""
        return "privileged" if self.platform is None else "learned"

    @property
    def auction_estimator(self) -> str:
        """What the auction inside ``step`` ranks on: "learned" with ``attach_auction(model)``, else "privileged"."""
        return "privileged" if self.auction_model is None else "learned"

    def _checked_model(self, model: FunnelModel | None) -> FunnelModel | None:
        """``model`` on the market's device in eval mode, after checking it was fitted on this catalog."""
        if model is not None:
            model.check_catalog(self.catalog)
            model = model.to(self.device).eval()
        return model

    def attach_platform(self, model: FunnelModel | None) -> None:
        """Score with the learned pCTR/pCVR ``model`` by default (None detaches it: back to "privileged").

        The model is moved to the market's device and put in eval mode. The auction inside ``step`` is not
        affected: it ranks on the privileged estimator, or on the model given to ``attach_auction``.

        Raises:
            ValueError: if ``model`` was trained on another catalog (sizes or embedding fingerprint).
        """
        self.platform = self._checked_model(model)

    def attach_auction(self, model: FunnelModel | None) -> None:
        """Make the auction inside ``step`` rank on the learned pCTR/pCVR ``model`` (None: the privileged one).

        A production auction ranks on the production models' eCPM, which read only what the platform
        observes: the model is evaluated on the platform view (``observe``) and the catalog, by the same code
        as ``score(estimator="learned")``. Clicks and conversions still come from the hidden truth. While it
        is attached, every ``score`` estimator takes P(win) and price from this auction (the platform knows
        its own auction model) and only the funnel from the estimator. The default estimator of ``score`` is
        not changed (``attach_platform`` sets it).

        Raises:
            ValueError: if ``model`` was trained on another catalog (sizes or embedding fingerprint).
        """
        self.auction_model = self._checked_model(model)

    def learned_estimate(
        self, model: FunnelModel, state: SessionState, candidates: torch.Tensor
    ) -> Probabilities:
        """``model``'s pCTR/pCVR of ``candidates`` (N, K) for the requests of ``state``, from the platform view.

        The one home of a learned estimate, for ``score`` and the learned auction alike: the model reads the
        observation of ``state`` (``observe``) and the catalog, never the hidden state; invalid ids are
        valued as ad 0 (callers mask them).
        """
        valid = (candidates >= 0) & (candidates < self.config.num_ads)
        ads = torch.where(valid, candidates, torch.zeros_like(candidates))
        with torch.no_grad():
            return model(self.catalog, observe(self.world, state), ads)

    def auction_estimate(self, state: SessionState, candidates: torch.Tensor) -> Probabilities | None:
        """What the auction ranks ``candidates`` on: the attached auction model's estimate, or None (privileged)."""
        if self.auction_model is None:
            return None
        return self.learned_estimate(self.auction_model, state, candidates)

    def require_reset(self, what: str) -> None:
        """Raise ``RuntimeError("call reset() before {what}")`` while no session has started."""
        if self.state is None:
            raise RuntimeError(f"call reset() before {what}")

    def reset(self, seed: int | None = None, first_slot: int | None = None) -> dict[str, torch.Tensor]:
        """Start new sessions in every row; ``seed`` keys all random draws and reopens the market.

        ``first_slot``: global slot index of row 0 (kept for later resets); rows are slots
        ``first_slot .. first_slot + N - 1``, so a shard of a larger market draws the same streams.
        """
        seed = check_seed(seed)
        if first_slot is not None:
            self.first_slot = int(first_slot)
        n, dev = self.num_envs, self.device
        if self.state is None or seed is not None:
            base = 0 if seed is None else seed
            seeds = torch.full((n,), base, dtype=torch.int64, device=dev)
            counter = torch.zeros(n, dtype=torch.int64, device=dev)
            episode = torch.zeros(n, dtype=torch.int64, device=dev)
        else:
            seeds, counter, episode = self.state.seed, self.state.counter, self.state.episode + 1
        slots = torch.arange(self.first_slot, self.first_slot + n, dtype=torch.int64, device=dev)
        if self.market is None or seed is not None:  # a new seed reopens the market; else budgets carry on
            self.market = open_market(self.world, self.market_envs)
        self.state = initial(self.world, seeds, slots, counter, episode)
        self.episode_return.zero_()
        self.episode_length.zero_()
        return observe(self.world, self.state)

    def step(self, candidates: torch.Tensor, autoreset: bool = True):
        """Advance every row by one request.

        Returns (obs, outcome, final_obs, episode_return, episode_length): when ``autoreset`` is on,
        rows whose session ended are restarted at once and ``obs`` is their new first observation;
        ``final_obs`` is the observation that ended the session (equal to ``obs`` for other rows).
        """
        self.require_reset("step()")
        estimate = self.auction_estimate(self.state, candidates)
        state, self.market, out = transition(
            self.world, self.state, self.market, candidates, self.grant, estimate
        )
        self.episode_return += out.reward.double()
        self.episode_length += 1
        final_obs = observe(self.world, state)
        ep_ret, ep_len = self.episode_return.clone(), self.episode_length.clone()
        done = out.terminated | out.truncated
        if autoreset:
            rows = torch.nonzero(done).squeeze(1)  # one host sync per step; rows restart in place
            if rows.numel() > 0:
                fresh = initial(
                    self.world,
                    state.seed[rows],
                    state.slot[rows],
                    state.counter[rows],
                    state.episode[rows] + 1,
                )
                state = state.put(rows, fresh)
                self.episode_return[rows] = 0.0
                self.episode_length[rows] = 0
            obs = observe(self.world, state)
        else:
            obs = final_obs
        self.state = state
        return obs, out, final_obs, ep_ret, ep_len

    def score(
        self,
        candidates: torch.Tensor,
        truth: bool = False,
        state: SessionState | None = None,
        estimator: str | None = None,
    ) -> CandidateScores:
        """Expected value of candidate ads (N, K) for the current requests, without moving the world.

        ``state``: score these sessions instead of the current ones, e.g. some rows
        (``self.state.select(rows)``) or requests rehearsed by ``rehearse``; candidates then have its rows.
        ``estimator``: one of ``ESTIMATORS``, default ``self.estimator``; ``truth=True`` is "truth". The
        learned model reads only the observation of ``state`` (``observe``) and the catalog.

        With the privileged auction, eCPM, P(win) and price are the estimator's own (the learned estimator
        predicts the auction with its own pCTR/pCVR, as it cannot read the privileged one). With a learned
        auction (``attach_auction``) every estimator takes them from the auction's model, which reads only the
        platform view, so P(win) and price are what ``step`` does, and only the funnel is the estimator's.

        Raises:
            ValueError: for an unknown or conflicting estimator, or "learned" with no model attached.
        """
        self.require_reset("score()")
        name = resolve_estimator(truth, estimator, self.estimator)
        state = self.state if state is None else state
        if name == "learned" and self.platform is None:
            raise ValueError("estimator='learned' needs a pCTR/pCVR model: call attach_platform(model) first")
        auction = self.auction_estimate(state, candidates)
        if name != "learned":
            return score(self.world, state, candidates, truth=name == "truth", auction=auction)
        if self.platform is self.auction_model:
            est = auction  # one model: one evaluation
        else:
            est = self.learned_estimate(self.platform, state, candidates)
        return score(self.world, state, candidates, estimate=est, auction=auction)

    def eligible_ads(self) -> torch.Tensor:
        """(num_ads,) bool: ads whose advertiser can bid in the next auction."""
        self.require_reset("eligible_ads()")
        return eligible_ads(self.world, self.market)

    def remaining_budget(self) -> torch.Tensor:
        """(num_advertisers,) float64: what each advertiser can still spend in the current budget day."""
        self.require_reset("remaining_budget()")
        return remaining_budget(self.world, self.market)

    def market_features(self) -> torch.Tensor:
        """(F_m,) float32 the platform's ledger of the next auction (``gpr_sim.platform.market``), shared by
        every current request (and by rehearsed ones: rehearsal moves no budget)."""
        self.require_reset("market_features()")
        return market_features(self.world, self.market)

    def rehearse(self, rows: torch.Tensor, seed_offset: int = REHEARSAL_SEED_OFFSET) -> Rehearsal:
        """The next request of sessions ``rows`` (R,) if no ad were shown now; moves nothing.

        The world's pure transition runs one step ahead for those rows with an empty candidate list, on
        their own random stream (seed + ``seed_offset``, so rehearsal never peeks at the real next draw):
        the user is kept, the organic items they consume next and the context (position, time, ad load)
        move. The market is read, never written; the step's grant is not called (no ad means no charge,
        and a data-parallel grant is a collective over every rank's rows, not a chosen few), and the auction
        model is not evaluated (with no candidate, nothing is ranked).
        """
        self.require_reset("rehearse()")
        state = self.state.select(rows)
        state = state._replace(seed=state.seed + seed_offset)
        none = torch.full((rows.numel(), 1), -1, dtype=torch.int64, device=self.device)
        ahead, _, _ = transition(self.world, state, self.market, none)
        return Rehearsal(ahead, observe(self.world, ahead))

    def observe(self) -> dict[str, torch.Tensor]:
        """The observation of the current requests (what the last ``reset`` or ``step`` returned)."""
        self.require_reset("observe()")
        return observe(self.world, self.state)

    def state_dict(self) -> dict:
        """A copy of everything that moves: the sessions, the market, and the running episode totals.

        ``load_state_dict`` on a market of the same world, size and shard resumes it bit for bit (the
        random streams are keyed by the session state, so no generator needs saving).
        """
        self.require_reset("state_dict()")
        return {
            "session": tuple(t.clone() for t in self.state),
            "market": tuple(t.clone() for t in self.market),
            "episode_return": self.episode_return.clone(),
            "episode_length": self.episode_length.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` (from any device) onto this market's device."""
        session, market = tuple(state["session"]), tuple(state["market"])
        if len(session) != len(SessionState._fields) or len(market) != len(MarketState._fields):
            raise ValueError(
                f"state_dict holds {len(session)} session and {len(market)} market fields: expected "
                f"{len(SessionState._fields)} and {len(MarketState._fields)}"
            )
        if session[0].shape[0] != self.num_envs:
            raise ValueError(f"state_dict has {session[0].shape[0]} sessions, this market {self.num_envs}")
        self.state = SessionState(*(t.to(self.device) for t in session))
        self.market = MarketState(*(t.to(self.device) for t in market))
        self.episode_return = state["episode_return"].to(self.device)
        self.episode_length = state["episode_length"].to(self.device)


class Rehearsal(NamedTuple):
    """Requests rehearsed one step ahead (``BatchedMarket.rehearse``), R of them."""

    state: SessionState  # (R, ...) the sessions one step ahead; ``score(..., state=)`` values ads for them
    obs: dict[str, torch.Tensor]  # (R, ...) their observations


def outcome_info(out: Outcome) -> dict[str, torch.Tensor]:
    """The per-step info dict: every raw signal of the request, batch first."""
    info = {k: getattr(out, k) for k in INFO_KEYS_PER_SLOT + INFO_KEYS_PER_REQUEST}
    info["reward"] = out.reward
    return info
