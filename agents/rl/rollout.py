"""Rollouts of the GPR generator in ads-v0 for the RL learners: groups, scores, rehearsal -> ``Buffer``.

One env step for N sessions (all tensors, no loop over users):

    obs -> tokens -> context (refiner noise kept) -> K sampled paths per request (trie + budget masks)
        -> HTE values of every prefix -> simulator scores of the K ads (``final_value``) -> process rewards
        -> the first sampled ad is served: env.step

**Decoding** (``sample_groups``): the HSD runs once per request (the observation's organic history moves
between requests, so no HSD cache can be appended to exactly: ``gpr_sim.model.incremental``); head 0's
PTD context K/V are computed once per request and each of the L' levels decodes only the K paths'
generated tokens against them (the cached PTD that beam search and the incremental decoder use), then
the HTE values every prefix of the K paths from the context once. ``cached=False`` is the reference (a
full PTD pass over context + prefix for every path and level), kept for the parity tests and
``benchmarks/bench_rl_iteration.py --old``. ``precision="bf16"`` runs the model under bfloat16 autocast.

**Rewards.** R = the scoring API's expected value of the ad for this request (revenue, GMV, clicks and
conversions under the world's reward weights, GPR's final_value) under the funnel probabilities of
``estimator``: "learned" (``agents.hepo``'s default: the pCTR / pCVR the platform fitted on its logs and
attached to the env, as the paper's simulator uses production models), "privileged" (the simulator's
noisy-truth estimator) or "truth" (the simulator's true funnel; a privileged variant, never mixed with the
others in one comparison). It is divided by a fixed
``reward_scale`` (the std of R in the first rollout, kept in the checkpoint) so the critic sees unit-scale
targets whatever the world's currency.

**The reward model's monitor** (``truth_monitor``). The same sampled ads of the real requests are also valued
under the simulator's true funnel: ``rollout/truth/group_value_mean`` beside ``rollout/group_value_mean``, and
the within-group correlation of reward and truth ``rollout/truth/reward_corr``. No platform can compute these
(a labelled privileged diagnostic: logged, never in a learner's targets); the simulator can, and they show a
learner over-optimising the learned pCTR / pCVR iteration by iteration (the rewarded value climbs while the true
one falls), which the held-out evaluation shows only every ``--eval-every`` iterations.

**Outcomes.** ``outcome="expected"`` (default) pays each candidate its expected value, as above, and GPR's
final_value does. ``outcome="realised"`` pays one draw of what serving the candidate alone would realise
(``realised_rewards``: the auction won with P(win), then a click, a conversion and the user staying, each drawn
from the same estimator's probabilities, the price E[price | win] and the order value the ad's mean), whose
expectation is that value: the noisy per-request rewards of a live system, the setting in which per-level
credit assignment and a critic are meant to earn their keep. The draws are keyed like the others (``Randomness``).

**Budgets.** The scoring API values an ad as if its advertiser could pay for it, but the sessions of one
step share the advertisers' budgets: when many of them are served the same advertiser, the auction
refuses the charges beyond its remaining budget (no impression, no value). With ``budget_aware`` (default)
each candidate's R is multiplied by its advertiser's budget share this step, remaining / expected demand
(capped at 1), where demand is the expected charge of the ads the sessions are actually served; without
it a learner is paid for concentrating on a few high-value ads whose budgets then refuse most slots.
Rehearsed requests use the share of the real step they rehearse. The buffer also keeps each candidate's
value before the share (``Buffer.blind_reward``): HEPO's critic regresses that stationary target, since
the share depends on the other sessions' draws of the step, which no prefix value can see
(``agents.rl.hepo``).

**Randomness.** Every draw of a request (refiner noise, the K paths level by level, whether it is
rehearsed) comes from ``gpr_sim.world.rng`` keyed by (seed, the session's global env slot, step), like the
world's own draws: a session's rollout does not depend on the batch it sits in, so W data-parallel ranks
holding a shard of the sessions each draw exactly what one process draws for those rows.

**ARR** (anticipatory request rehearsal, GPR §4.4): for a random subset of sessions, more often for
active users (probability ``arr_rate x tier / 5``), the world's pure transition is run one step ahead
with no ad shown, on its own random stream: U is kept, O holds the organic items the user consumes next,
E (position, time, ad load) is refreshed. That rehearsed request is scored and trained on beside the real
one; the real market and sessions do not move.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.profiler import record_function

from agents.rl.buffer import Buffer
from agents.rl.common import process_rewards
from agents.rl.distributed import SINGLE, Dist, all_reduce_sum
from envs.market import REHEARSAL_SEED_OFFSET
from gpr_sim.finite import check_finite
from gpr_sim.model import GPRModel
from gpr_sim.model.hsd import Segments, type_segments
from gpr_sim.model.hte import path_ad_features
from gpr_sim.model.incremental import head_context_kv, request_major_step
from gpr_sim.model.precision import check_precision, precision_context
from gpr_sim.platform.features import PlatformFeatures
from gpr_sim.sampling import PathSample, sample_paths
from gpr_sim.schema import SchemaConfig, TokenBatch, tokens_from_obs
from gpr_sim.tokenizer.trie import PrefixTrie
from gpr_sim.tokenizer.world import WorldTokenizer
from gpr_sim.world import CandidateScores, rng
from gpr_sim.world.reward import weighted_reward
from gpr_sim.world.state import EVENT_CLICK

TYPE_O, TYPE_I = 1, 3
"""token types of ``gpr_sim.schema`` (U=0, O=1, E=2, I=3)"""
CONTEXT_CHUNK = 8192
"""requests per pass of a rollout step's model calls (``sample_groups``)"""
ARR_DRAW_SALT = 0xA22
"""added to the rollout seed for the draw that decides which sessions rehearse"""
REWARD_DRAW_SALT = 0x5EA1
"""added to the rollout seed for the draws of realised rewards (``outcome="realised"``)"""
OUTCOMES = ("expected", "realised")
"""what a candidate's reward is: its expected value, or one draw of its realised value (module doc)"""
SLOT_BITS = 24
"""request ids (``Roller.request_ids``) hold the global env slot in their low bits"""


def realised_rewards(world, items: Tensor, scores: CandidateScores, u: Tensor) -> Tensor:
    """(n, K) one draw of the reward each candidate would realise if it were served alone (module doc,
    ``outcome="realised"``); its expectation over ``u`` is ``scores.value``.

    ``u``: (n, 4K) uniforms in (0, 1), four per candidate (win, click, conversion, stay). The price of a won
    auction and the order value of a conversion are their means (E[price | win] = E[price] / P(win)), so the
    noise is the funnel's: Bernoulli events, not the competitor's bid or the order size."""
    n, k = items.shape
    d = u.view(n, k, 4)
    ads = items.clamp_min(0)
    win = d[..., 0] < scores.p_win
    click = win & (d[..., 1] < scores.p_click)
    conversion = click & (d[..., 2] < scores.p_conversion)
    stay = d[..., 3] < scores.p_stay
    price = torch.where(win, scores.expected_revenue / scores.p_win.clamp_min(1e-30), 0.0)
    gmv = conversion * world.ad_value_mean[ads]
    return weighted_reward(world.config.reward, price, gmv, click.float(), conversion.float(), stay.float())


def truth_monitor(reward: Tensor, truth: Tensor, valid: Tensor) -> Tensor:
    """Sums of the reward-model monitor over a batch of groups: (4,) float64 = (sum over requests of the mean
    truth value of their K candidates, then the within-group cross and square sums of reward and truth).

    ``reward`` (n, K) is what the learner is paid for each sampled candidate, ``truth`` (n, K) the same
    candidates' value under the simulator's true funnel (both in currency, after the budget share), ``valid``
    (n, K) the candidates that are ads. The group-relative learners follow the order of the rewards inside a
    group, so the pooled within-group correlation of reward and truth (``Roller.collect``:
    ``rollout/truth/reward_corr``) says how far following the reward model moves the policy towards truth, and
    the truth value of the sampled groups (``rollout/truth/group_value_mean``, beside the rewarded
    ``rollout/group_value_mean``) shows over-optimisation of the reward model as it happens: the rewarded value
    climbs while the true one falls. Privileged (the simulator's hidden funnel): a diagnostic that is logged,
    never part of any learner's targets.
    """
    m = valid.to(torch.float64)
    count = m.sum(1).clamp_min(1.0)
    r, t = reward.double() * m, truth.double() * m
    rc = (r - (r.sum(1) / count)[:, None]) * m
    tc = (t - (t.sum(1) / count)[:, None]) * m
    return torch.stack(
        [(t.sum(1) / reward.shape[1]).sum(), (rc * tc).sum(), rc.square().sum(), tc.square().sum()]
    )


def positive_paths(tokens: TokenBatch) -> Tensor:
    """(B, T, L') paths of the user's positive items (consumed organic, clicked/converted ads), else -1."""
    positive = (tokens.type_ids == TYPE_O) | ((tokens.type_ids == TYPE_I) & (tokens.event_ids >= EVENT_CLICK))
    positive &= ~tokens.padding_mask
    return tokens.semantic_codes.masked_fill(~positive[..., None], -1)


@torch.no_grad()
def sample_groups(
    model: GPRModel,
    trie: PrefixTrie,
    tokens: TokenBatch,
    eligible: Tensor | None,
    group_size: int,
    uniforms: Tensor,
    cached: bool = True,
    chunk: int = CONTEXT_CHUNK,
    ad_lookup: Callable[[Tensor], Tensor] | None = None,
    segments: Segments | None = None,
) -> tuple[Tensor | None, PathSample, Tensor]:
    """The HSD once per request -> K sampled paths per request (level by level) -> HTE values of every prefix.

    ``cached`` (the default): the request's context goes through the PTD decoder once (head 0's context
    K/V, ``gpr_sim.model.incremental``) and each level decodes only the K paths' generated tokens against
    it. ``cached=False`` is the reference: a full PTD pass over context + prefix per path and level. Both
    draw the same paths from the same ``uniforms`` (inverse CDF) up to rounding of the log-probs.

    Args:
        model: the generator (eval mode).
        trie: the ad trie.
        tokens: (N, T) requests.
        eligible: optional (num_ads,) bool.
        group_size: K.
        uniforms: (N, d + K L') keyed numbers: the refiner's noise (first d), then one per path and level.
        chunk: requests per pass (every number of a request is its own, the draws keyed per row, so chunks
            change nothing; they bound the activations of a wide rollout: (chunk, T, 4 d) in the HSD,
            (chunk K, L', 3 d) in the PTD).
        ad_lookup: full paths -> the candidate ad's features for the HTE (``Roller.ad_lookup``); None when
            the model reads none.
        segments: the tokens' slot layout when the caller knows it (``SchemaConfig.segments``: no device sync);
            None reads it from the tokens once (``type_segments``).

    Returns:
        (refiner noise (N, d) or None, ``PathSample``, HTE values (N, K, L' + 1) float32).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is invalid: expected >= 1")
    n = tokens.token_ids.shape[0]
    if segments is None:
        segments = type_segments(tokens.type_ids)
    parts = [
        _sample_chunk(
            model, trie, TokenBatch(*(x[lo : lo + chunk] for x in tokens)), eligible, group_size,
            uniforms[lo : lo + chunk], cached, segments, ad_lookup,
        )
        for lo in range(0, max(n, 1), chunk)  # an empty batch: one empty chunk
    ]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    noise = None if parts[0][0] is None else torch.cat([p[0] for p in parts])
    samples = [p[1] for p in parts]
    sample = PathSample(
        torch.cat([x.items for x in samples]),
        torch.cat([x.codes for x in samples]),
        torch.cat([x.log_prob for x in samples]),
        [torch.cat(level) for level in zip(*(x.legal for x in samples), strict=True)],
        torch.cat([x.valid for x in samples]),
    )
    return noise, sample, torch.cat([p[2] for p in parts])


def _sample_chunk(
    model: GPRModel,
    trie: PrefixTrie,
    tokens: TokenBatch,
    eligible: Tensor | None,
    group_size: int,
    uniforms: Tensor,
    cached: bool,
    segments: Segments | None,
    ad_lookup: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor | None, PathSample, Tensor]:
    """``sample_groups`` on one chunk of requests (``segments``: its slot layout, or None for mixed layouts)."""
    n, k, d = tokens.token_ids.shape[0], group_size, model.cfg.d_model
    noise = rng.normals(uniforms[:, :d]) if model.ptd.refiner is not None else None
    # the HSD over the whole request, once; with the slot layout the typed FFN and norms need no sort or gather
    ctx = model.context(tokens, noise=noise, segments=segments)  # (n, Cc, C)
    if cached:
        step_fn = request_major_step(model.ptd.level_logits_cached, head_context_kv(model, ctx), n)
    else:
        step_fn, _ = model.beam_fns(ctx)
    sample = sample_paths(step_fn, trie, n, k, eligible, uniforms=uniforms[:, d:].view(n, k, -1))
    feats = None if ad_lookup is None else ad_lookup(sample.codes)  # (n, K, F_ad): the candidates' ads
    values = model.path_values(ctx, sample.codes, feats).float()  # (n, K, L' + 1)
    return noise, sample, values


class Roller:
    """Steps N sessions with the current generator and fills a ``Buffer`` (module doc).

    Args:
        env: an ads-v0 vector env (``AdsVectorEnv``): it gives scores, budgets, eligibility, its state and
            rehearsed requests.
        tokenizer: the world's tokenizer, on the env's device.
        group_size: K paths per request.
        estimator: the scoring API's estimator of the rewards (``envs.market.ESTIMATORS``; "learned" needs a
            model attached to the env: ``attach_platform``).
        arr_rate: ARR probability at the top activity tier (0 = no rehearsal).
        seed: seeds the env and the keyed draws (module doc).
        budget_aware: scale each candidate's value by its advertiser's budget share this step (module doc).
        dist: the data-parallel job: this env holds its rows (``agents.rl.distributed.shard_env``); budget
            demand, the reward scale and the statistics are reduced over every rank's rows.
        precision: ``fp32`` (reference) or ``bf16`` (autocast) for the model's forward passes.
        cached: sample through the cached PTD (``sample_groups``); False = the full-forward reference.
        outcome: ``OUTCOMES``: each candidate's expected value, or one draw of its realised value (module doc).
    """

    def __init__(
        self,
        env,
        tokenizer: WorldTokenizer,
        group_size: int,
        estimator: str,
        arr_rate: float,
        seed: int,
        budget_aware: bool = True,
        dist: Dist = SINGLE,
        precision: str = "fp32",
        cached: bool = True,
        outcome: str = "expected",
    ):
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome={outcome!r} is unknown: expected one of {OUTCOMES}")
        self.precision, self.cached, self.outcome = check_precision(precision), cached, outcome
        self.env = env
        self.budget_aware, self.dist, self.seed = budget_aware, dist, seed
        self.market = env.unwrapped  # the vector env: scoring, budgets, eligibility, state and rehearsal
        self.device = self.market.device
        self.tok = tokenizer.to(self.device)
        self.schema = SchemaConfig.from_world(self.market.config)
        # the slot layout of every token batch it builds, known on the host
        self.segments: Segments | None = self.schema.segments
        self.features = PlatformFeatures.from_world(self.market.world).to(self.device)  # used per model.cfg
        self.group_size, self.estimator, self.arr_rate = group_size, estimator, arr_rate
        self.step_count = 0  # env steps so far: the counter of the keyed draws (module doc)
        self.obs, _ = env.reset(seed=seed)
        self.reward_scale: float | None = None
        # what the algorithm's targets carry from one rollout to the next (HEPO: its critic's explained
        # variance, which decides whether GAE is used): every buffer holds this dict, the checkpoint keeps it
        self.learner_state: dict[str, float] = {}
        # per step since the last ``pop_episodes``: (episode return, length, done), filtered when popped
        # so that stepping needs no host sync
        self._episodes: list[tuple[Tensor, Tensor, Tensor]] = []

    # -- state that must survive a checkpoint ------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "obs": self.obs,
            **self.market.state_dict(),
            "step_count": self.step_count,
            "reward_scale": self.reward_scale,
            "learner_state": dict(self.learner_state),
        }

    def load_state_dict(self, state: dict) -> None:
        self.market.load_state_dict(state)
        self.obs = {k: v.to(self.device) for k, v in state["obs"].items()}
        self.step_count = int(state["step_count"])
        self.reward_scale = state["reward_scale"]
        self.learner_state.clear()  # the same dict: the buffers to come hold it
        self.learner_state.update(state.get("learner_state", {}))  # a checkpoint from before it: empty

    def pop_episodes(self) -> tuple[Tensor, Tensor]:
        """Returns and lengths of the sessions that ended since the last call (CPU float64 / int64)."""
        if not self._episodes:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        ret, length, done = (torch.cat(parts).cpu() for parts in zip(*self._episodes))
        self._episodes = []
        return ret[done], length[done]

    # -- one request batch -------------------------------------------------------------------------
    def _keys(self, salt: int, rows: Tensor) -> Tensor:
        """Draw keys of sessions ``rows`` (local indices) at this step: (seed + salt, global slot, step)."""
        seed = torch.full_like(rows, self.seed + salt)
        return rng.stream_keys(seed, self.market.first_slot + rows, torch.full_like(rows, self.step_count))

    def request_ids(self, rows: Tensor, rehearsed: bool) -> Tensor:
        """Ids of this step's (real or rehearsed) requests of sessions ``rows``, unique over ranks and steps:
        ((step x 2 + rehearsed) << SLOT_BITS) + global slot (so at most 2^SLOT_BITS sessions)."""
        return ((self.step_count * 2 + int(rehearsed)) << SLOT_BITS) + self.market.first_slot + rows

    def ad_lookup(self, model: GPRModel) -> Callable[[Tensor], Tensor] | None:
        """Full paths (..., L') -> (..., F_ad) platform features of the ad each names
        (``gpr_sim.model.hte.path_ad_features``), or None when ``model``'s HTE reads none."""
        if not model.cfg.hte_ad_features:
            return None
        return functools.partial(path_ad_features, self.tok, self.features)

    def _groups(self, model: GPRModel, tokens: TokenBatch, eligible: Tensor, keys: Tensor):
        """Context, K sampled paths and HTE values for a token batch; its random numbers come from ``keys``."""
        u = rng.uniforms(keys, model.cfg.d_model + self.group_size * self.tok.trie.depth)
        lookup = self.ad_lookup(model)
        with precision_context(self.device, self.precision):
            return sample_groups(
                model, self.tok.trie, tokens, eligible, self.group_size, u, self.cached, ad_lookup=lookup,
                segments=self.segments,  # known on the host: no device sync per step
            )  # fmt: skip

    def _budget_share(self, items: Tensor, scores: CandidateScores) -> Tensor:
        """(A,) share of each advertiser's expected demand this step that its remaining budget covers.

        Demand is the expected charge (``expected_revenue``) of the ads the sessions are served now (the
        first path of each group); an advertiser asked for more than it has left grants the share
        remaining / demand, in expectation, and refuses the rest (``cap_to_budget``).
        """
        e = self.market
        remaining = e.remaining_budget()
        served = items[:, 0]
        charge = scores.expected_revenue[:, 0].double().clamp_min(0.0)
        demand = torch.zeros_like(remaining).index_add_(0, e.world.ad_advertiser[served], charge)
        demand = all_reduce_sum(demand, self.dist)  # every rank's sessions draw on the same budgets
        share = (remaining.clamp_min(0.0) / demand.clamp_min(1e-12)).clamp(max=1.0)
        return torch.where(demand > 0, share, torch.ones_like(share)).to(torch.float32)

    def _buffer(
        self,
        model,
        obs,
        scorer,
        eligible,
        rows: Tensor,
        rehearsed: bool,
        share: Tensor | None = None,
        truth_scorer=None,
    ):
        """Groups for one request batch -> (its buffer part, the sampled ads (n, K), their budget share, the
        truth monitor's sums or None).

        ``share``: per-advertiser budget share (``_budget_share``) that scales each candidate's value;
        None computes it from this batch when ``budget_aware`` is on (the real requests). ``truth_scorer``
        (the real requests): scores the same ads under the simulator's truth for ``truth_monitor``; None
        with the truth estimator, whose rewards are that value already.
        """
        with record_function("rollout/tokens"):
            features = self.features if model.cfg.platform_features else None
            market = self.market.market_features() if model.cfg.market_features else None  # rehearsal too
            tokens = tokens_from_obs(
                obs, self.tok.table, self.schema, check=False, features=features, market=market
            )
        keys = self._keys(REHEARSAL_SEED_OFFSET if rehearsed else 0, rows)
        with record_function("rollout/sample"):
            noise, s, values = self._groups(model, tokens, eligible, keys)
        with record_function("rollout/score"):
            return self._scored(tokens, noise, s, values, scorer, rows, rehearsed, share, truth_scorer)

    def _scored(self, tokens, noise, s: PathSample, values, scorer, rows, rehearsed, share, truth_scorer):
        """``_buffer``'s second half: the sampled ads scored (budgets, scale, the truth monitor) into the
        buffer part; its own profiler label (``rollout/score``) beside the sampling's."""
        scores = scorer(s.items)
        if self.outcome == "realised":
            salt = REWARD_DRAW_SALT + (REHEARSAL_SEED_OFFSET if rehearsed else 0)
            u = rng.uniforms(self._keys(salt, rows), 4 * self.group_size)
            raw = realised_rewards(self.market.world, s.items, scores, u).to(torch.float32)
        else:
            raw = scores.value.to(torch.float32)  # (n, K)
        raw = torch.where(
            s.items >= 0, raw, torch.zeros_like(raw)
        )  # no item (a row with none eligible): -inf
        blind = raw  # (n, K) before the budget share
        if self.budget_aware:
            share = self._budget_share(s.items, scores) if share is None else share
            raw = raw * share[self.market.world.ad_advertiser[s.items]]
        if (
            self.reward_scale is None
        ):  # first rollout: fix the scale once (module doc), over every rank's rows
            moments = torch.stack(
                [
                    torch.tensor(float(raw.numel()), device=raw.device),
                    raw.double().sum(),
                    raw.double().square().sum(),
                ]
            ).double()
            count, total, squares = all_reduce_sum(moments, self.dist).tolist()
            self.reward_scale = max(
                math.sqrt(max(squares - total * total / count, 0.0) / max(count - 1, 1)), 1e-6
            )
        monitor = None
        # the real requests: what the learner is paid vs what the simulator's truth says the same ads are worth
        if not rehearsed:
            with record_function("rollout/monitor"):  # within rollout/score: the privileged diagnostic's cost
                truth = scores.value if truth_scorer is None else truth_scorer(s.items).value
            truth = torch.where(s.items >= 0, truth.to(torch.float32), torch.zeros_like(raw))
            if self.budget_aware:
                truth = truth * share[self.market.world.ad_advertiser[s.items]]
            monitor = truth_monitor(raw, truth, s.items >= 0)
        proc = process_rewards(s.codes, s.legal, positive_paths(tokens), 1.0)  # scaled by a_l in the learner
        flag = torch.full((s.codes.shape[0],), rehearsed, dtype=torch.bool, device=self.device)
        part = Buffer(
            tokens,
            noise,
            s.codes,
            s.log_prob,
            s.legal,
            values,
            raw / self.reward_scale,
            proc,
            s.valid,
            flag,
            uid=self.request_ids(rows, rehearsed),
            blind_reward=blind / self.reward_scale if self.budget_aware else None,
            dist=self.dist,
            learner_state=self.learner_state,
        )
        return part, s.items, share, monitor

    def collect(self, model: GPRModel, steps: int) -> tuple[Buffer, dict[str, float]]:
        """``steps`` env steps of all sessions (+ rehearsed requests) -> (buffer, rollout statistics)."""
        e = self.market
        parts: list[Buffer] = []
        raw_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        monitor_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        truth_scorer = None if self.estimator == "truth" else lambda ads: e.score(ads, estimator="truth")
        for _ in range(steps):
            eligible = e.eligible_ads()
            state = e.state
            local = torch.arange(e.num_envs, device=self.device)
            real, items, share, monitor = self._buffer(
                model,
                self.obs,
                lambda ads: e.score(ads, estimator=self.estimator),
                eligible,
                local,
                False,
                truth_scorer=truth_scorer,
            )
            parts.append(real)
            raw_sum += (real.reward.double() * self.reward_scale).mean(1).sum()
            monitor_sums += monitor
            if self.arr_rate > 0:
                tier = e.world.user_activity[state.user_id].float()
                draw = rng.uniforms(self._keys(ARR_DRAW_SALT, local), 1)[:, 0]
                rows = torch.nonzero(draw < self.arr_rate * tier / 5.0).squeeze(1)
                if rows.numel() > 0:
                    with record_function("rollout/rehearse"):
                        ahead, obs_ahead = e.rehearse(rows, REHEARSAL_SEED_OFFSET)
                    rehearsed, _, _, _ = self._buffer(
                        model,
                        obs_ahead,
                        lambda ads, st=ahead: e.score(ads, estimator=self.estimator, state=st),
                        eligible,
                        rows,
                        True,
                        share,
                    )
                    parts.append(rehearsed)
            with record_function("rollout/env_step"):
                self.obs, _, terminated, truncated, info = self.env.step(items[:, :1])
            self._episodes.append((info["episode_return"], info["episode_length"], terminated | truncated))
            self.step_count += 1
        buf = Buffer.concat(parts)
        # one NaN request poisons a whole update (gpr_sim.finite): stop at the rollout that made it
        blind = {} if buf.blind_reward is None else {"budget-blind reward": buf.blind_reward}
        check_finite(
            f"rollout ending at env step {self.step_count}",
            {
                "reward": buf.reward,
                "log-probabilities": buf.old_log_prob,
                "HTE values": buf.old_values,
                "process rewards": buf.process,
                **blind,
            },
        )
        real = ~buf.rehearsed
        sums = torch.cat(
            [
                torch.stack(
                    [real.sum().double(), buf.rehearsed.sum().double(), raw_sum, (~buf.valid).sum().double()]
                ),
                monitor_sums,
            ]
        )
        reduced = all_reduce_sum(sums, self.dist).tolist()  # the global batch
        requests, rehearsed, value, invalid = reduced[:4]
        truth_value, cross, reward_sq, truth_sq = reduced[4:]
        stats = {
            "rollout/requests": int(requests),
            "rollout/rehearsed": int(rehearsed),
            "rollout/group_value_mean": value / max(requests, 1.0),
            "rollout/invalid_rows": int(invalid),
            "rollout/truth/group_value_mean": truth_value / max(requests, 1.0),
            "rollout/truth/reward_corr": cross / math.sqrt(reward_sq * truth_sq)
            if reward_sq > 0 and truth_sq > 0
            else 0.0,
        }
        return buf, stats


__all__ = [
    "OUTCOMES",
    "Roller",
    "SLOT_BITS",
    "positive_paths",
    "realised_rewards",
    "sample_groups",
    "truth_monitor",
]
