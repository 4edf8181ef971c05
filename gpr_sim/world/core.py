"""The functional core of the simulator: pure functions over batched tensors on any device.

    open_market(world, num_envs)                      -> MarketState
    initial(world, seed, slot, counter, episode)      -> SessionState      (a new session per row)
    transition(world, state, market, candidates, grant=None, estimate=None)
                                                      -> SessionState, MarketState, Outcome
    observe(world, state)                             -> dict of tensors   (U/O/E/I observation)
    score(world, state, candidates, truth=False, estimate=None, auction=None)
                                                      -> CandidateScores   (no state change)
    budget_day(world, market)                         -> BudgetDay         (the budget ledger now)

One request per step: the policy proposes candidates, the auction fills the slots, the funnel draws
clicks/conversions/GMV, budgets are charged, the user consumes organic content, fatigue and interests
move, and the user may leave. Randomness comes only from ``rng`` keyed by each row's (seed, slot,
counter), so a row's trajectory does not depend on the batch it sits in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gpr_sim.world import rng
from gpr_sim.world.auction import (
    advertiser_active,
    cap_to_budget,
    first_occurrence,
    gsp_auction,
    overdeliver_to_budget,
)
from gpr_sim.world.catalog import NUM_DEVICES, World
from gpr_sim.world.fatigue import exit_probability, fatigue_added, stay_probability
from gpr_sim.world.funnel import Probabilities, ecpm, platform_probabilities, true_probabilities
from gpr_sim.world.reward import weighted_reward
from gpr_sim.world.state import (
    EVENT_CLICK,
    EVENT_CONVERSION,
    EVENT_IMPRESSION,
    EVENT_PAD,
    PENDING_CONVERSIONS,
    MarketState,
    Outcome,
    SessionState,
)

CONTEXT_DIM = 5 + NUM_DEVICES  # feed position, hour sin/cos, ad load, session progress, device one-hot


def open_market(world: World, num_envs: int) -> MarketState:
    """Budgets scaled to the traffic of ``num_envs`` concurrent sessions (one request each per step)."""
    requests_per_day = num_envs * world.config.steps_per_day
    budget = world.advertiser_budget_share.double() * (requests_per_day / 1000.0)
    zeros = torch.zeros_like(budget)
    return MarketState(torch.zeros((), dtype=torch.int64, device=world.device), budget, zeros, zeros.clone())


Grant = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(advertiser (M,), charge (M,), remaining (A,)[, settle=Grant]) -> (granted (M,) bool, spend (A,)): how a
step's charges are settled against the budgets; ``transition`` takes one so that data-parallel shards of one
market can settle their charges together (``agents.rl.distributed.grant_across_ranks``). With a
``budget_settlement`` other than "in_order", ``transition`` passes the world's rule as ``settle=`` (a grant
that gathers charges settles them with it); with the default it calls ``grant(advertiser, charge, remaining)``."""


def grant_in_order(
    advertiser: torch.Tensor, charge: torch.Tensor, remaining: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``Grant``: ``cap_to_budget`` in request order, and the granted spend per advertiser.

    ``advertiser`` -1 marks no charge. ``spend`` is summed in the order of the charges, so settling a
    concatenation of shards in row order gives the single-process spend bit for bit.
    """
    return _with_spend(cap_to_budget(advertiser, charge, remaining), advertiser, charge, remaining)


def grant_overdeliver(
    advertiser: torch.Tensor, charge: torch.Tensor, remaining: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "overdeliver" ``Grant``: ``overdeliver_to_budget`` in request order, and the spend per advertiser.

    Summed in the order of the charges, as ``grant_in_order``, so a concatenation of shards settles bit for
    bit as one process.
    """
    return _with_spend(overdeliver_to_budget(advertiser, charge, remaining), advertiser, charge, remaining)


def _with_spend(
    granted: torch.Tensor, advertiser: torch.Tensor, charge: torch.Tensor, remaining: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(granted, spend (A,)): the granted charges summed per advertiser in the order of the charges."""
    paid = torch.where(granted & (advertiser >= 0), charge, torch.zeros_like(charge))
    spend = torch.zeros_like(remaining).index_add_(0, advertiser.clamp(min=0), paid)
    return granted, spend


def settlement(cfg) -> Grant:
    """The single-process ``Grant`` of ``cfg.budget_settlement`` (``config.BUDGET_SETTLEMENTS``).

    "in_order" (the default): a charge is granted only if it fits in what is left. Spend never exceeds the
    budget, but an advertiser whose leftover lies between the reserve (what eligibility checks) and the
    price it meets stays eligible and is refused every charge for the rest of the day: with budgets that
    bind, most auctions a greedy policy wins are refused this way (benchmarks/RESULTS.md, the herd).
    "overdeliver": served while the spend before the charge is below the budget, as a platform that checks
    a budget counter before each impression and bills what it delivered; the advertiser then drops out
    (``advertiser_active``), and a day's spend stays below budget plus one charge.
    """
    return {"in_order": grant_in_order, "overdeliver": grant_overdeliver}[cfg.budget_settlement]


def effective_reserve(cfg, u: torch.Tensor) -> torch.Tensor:
    """(N,) per-request reserve eCPM: the platform reserve or the best external competing bid."""
    if cfg.competitor_ecpm_mean <= 0:
        return torch.full_like(u, cfg.reserve_ecpm)
    sig = cfg.competitor_ecpm_sigma
    competitor = cfg.competitor_ecpm_mean * torch.exp(sig * rng.normals(u) - 0.5 * sig**2)
    return competitor.clamp(min=cfg.reserve_ecpm)


def _choose_by_interest(
    bits: torch.Tensor, u: torch.Tensor, interest: torch.Tensor, item_emb: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Each of the (N, M) choices picks one of R random items by Gumbel-max on match / temperature.

    bits: (N, M, R) random integers (candidate ids), u: (N, M, R) uniforms. Returns (N, M) item ids.
    Sampling R candidates keeps the cost O(N M R D) however large the catalog.
    """
    cand = bits % item_emb.shape[0]  # (N, M, R)
    logits = torch.einsum("nd,nmrd->nmr", interest, item_emb[cand]) / temperature + rng.gumbels(u)
    return cand.gather(2, logits.argmax(2, keepdim=True)).squeeze(2)


def initial(
    world: World, seed: torch.Tensor, slot: torch.Tensor, counter: torch.Tensor, episode: torch.Tensor
) -> SessionState:
    """Start a new session in every row: sample a user and their pre-session history."""
    cfg = world.config
    n, dev = seed.shape[0], world.device
    keys = rng.stream_keys(seed, slot, counter)
    Ho, Hi, H0, R = cfg.organic_history, cfg.ad_history, cfg.initial_ad_history, cfg.organic_candidates
    u = rng.uniforms(keys, 2 + 2 * H0)
    user = torch.searchsorted(world.user_session_cdf, u[:, 0].double()).clamp_(max=cfg.num_users - 1)
    interest = world.user_interest[user]
    hour = u[:, 1] * 24.0

    # Pre-session organic history: Ho interest-driven choices.
    off = 2 + 2 * H0
    bits = rng.hash_bits(keys, Ho * R, offset=1000).view(n, Ho, R)
    gum = rng.uniforms(keys, Ho * R, offset=1000 + Ho * R).view(n, Ho, R)
    organic_hist = _choose_by_interest(bits, gum, interest, world.organic_emb, cfg.organic_temperature)

    # Pre-session ad exposure: H0 ads the user was shown before, with their funnel outcome.
    ad_hist = torch.full((n, Hi), -1, dtype=torch.int64, device=dev)
    ad_event = torch.full((n, Hi), EVENT_PAD, dtype=torch.int64, device=dev)
    if H0 > 0:
        bits = rng.hash_bits(keys, H0 * R, offset=off * 1000).view(n, H0, R)
        gum = rng.uniforms(keys, H0 * R, offset=off * 1000 + H0 * R).view(n, H0, R)
        past = _choose_by_interest(bits, gum, interest, world.ad_emb, cfg.organic_temperature)
        zeros = torch.zeros(n, device=dev)
        pr = true_probabilities(world, past, interest, user, zeros, hour)
        clicked = u[:, 2 : 2 + H0] < pr.p_click
        converted = clicked & (u[:, 2 + H0 : 2 + 2 * H0] < pr.p_conversion)
        ev = EVENT_IMPRESSION + clicked.long() + converted.long()
        ad_hist[:, Hi - H0 :] = past
        ad_event[:, Hi - H0 :] = ev

    zi = torch.zeros(n, dtype=torch.int64, device=dev)
    P = PENDING_CONVERSIONS
    return SessionState(
        seed=seed,
        slot=slot,
        counter=counter + 1,
        episode=episode,
        user_id=user,
        interest=interest,
        fatigue=torch.zeros(n, device=dev),
        step=zi,
        feed_pos=zi.clone(),
        ad_load=zi.clone(),
        hour=hour,
        organic_hist=organic_hist,
        ad_hist=ad_hist,
        ad_event=ad_event,
        pend_ad=torch.full((n, P), -1, dtype=torch.int64, device=dev),
        pend_gmv=torch.zeros(n, P, device=dev),
        pend_due=torch.full((n, P), -1, dtype=torch.int64, device=dev),
    )


def _push(hist: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Append the ``keep``-ed entries of ``new`` (N, S) to ``hist`` (N, H), most recent last."""
    n, h = hist.shape
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, in order
    compact = new.gather(1, order)
    count = keep.sum(1, keepdim=True)  # (N, 1)
    seq = torch.cat([hist, compact], dim=1)  # (N, H + S)
    idx = count + torch.arange(h, device=hist.device)[None, :]
    return seq.gather(1, idx)


class CandidateScores(NamedTuple):
    """Expected value of candidate ads for the current requests, (N, K) each.

    Each candidate is valued as if it were the request's only candidate in the top slot: it wins
    when its platform eCPM beats the reserve and the external competitor, and then pays the larger
    of the two (second price). Funnel probabilities are the platform's estimates, or the truth.
    """

    p_click: torch.Tensor  # given an impression
    p_conversion: torch.Tensor  # given a click
    ecpm: torch.Tensor  # platform eCPM = 1000 x bid x pCTR_hat x pCVR_hat (what the auction ranks)
    p_win: torch.Tensor  # probability of winning the auction
    expected_revenue: torch.Tensor  # E[price charged]
    expected_gmv: torch.Tensor  # p_win x pCTR x pCVR x mean order value
    p_stay: torch.Tensor  # P(the user stays after the request), over winning and losing the auction
    value: torch.Tensor  # expected immediate reward under the world's reward weights


def auction_expectations(cfg, bid_ecpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P(win) and E[price] of a lone candidate with platform eCPM ``bid_ecpm``.

    The competitor B is log-normal (mean m, sigma s; mu = ln m - s^2/2); the candidate wins when
    e >= max(r, B) and pays max(r, B)/1000. With E[B 1{B<=x}] = m Phi((ln x - mu - s^2)/s):
    E[price] = (r P(B<=r) + m [Phi(a_e) - Phi(a_r)]) / 1000 for e >= r, and 0 below the reserve.
    """
    r = cfg.reserve_ecpm
    e = bid_ecpm.double()
    above = e >= r
    if cfg.competitor_ecpm_mean <= 0:
        return above.to(bid_ecpm.dtype), (above * (r / 1000.0)).to(bid_ecpm.dtype)
    m, sg = cfg.competitor_ecpm_mean, cfg.competitor_ecpm_sigma
    mu = math.log(m) - 0.5 * sg**2
    log_e = torch.log(e.clamp(min=r))
    p_below_r = torch.special.ndtr(torch.tensor((math.log(r) - mu) / sg, dtype=torch.float64))
    p_win = torch.special.ndtr((log_e - mu) / sg)
    partial = m * (
        torch.special.ndtr((log_e - mu - sg**2) / sg)
        - torch.special.ndtr(torch.tensor((math.log(r) - mu - sg**2) / sg, dtype=torch.float64))
    )
    price = (r * p_below_r + partial) / 1000.0
    zero = torch.zeros_like(e)
    return torch.where(above, p_win, zero).to(bid_ecpm.dtype), torch.where(above, price, zero).to(
        bid_ecpm.dtype
    )


def score(
    world: World,
    state: SessionState,
    candidates: torch.Tensor,
    truth: bool = False,
    slot: int = 0,
    estimate: Probabilities | None = None,
    auction: Probabilities | None = None,
) -> CandidateScores:
    """Expected value of arbitrary candidate ads (N, K) for the current requests; moves nothing.

    The auction always runs on the platform's estimates (as in the real system); ``truth`` only
    swaps the funnel probabilities for the hidden true ones (oracle studies). Budgets and pacing
    are not considered here (see ``eligible_ads``). Invalid ids score -inf value.

    ``value`` is THE reward formula (``reward.weighted_reward``) of the expected signals. Its stay term
    is ``p_stay`` = ``fatigue.stay_probability``: ``transition``'s exit model at the fatigue the request
    leaves behind, with the ad shown (P(win)) or the slot empty. With ``truth`` it reads the hidden
    state (current fatigue, the ad's true match, the user's tolerance), so for one candidate with
    budgets that do not bind, ``value`` is the expectation of ``transition``'s reward given the state
    (conversion delays only move the GMV and conversion credit to a later request). The platform
    sees neither fatigue nor tolerance, so its estimate (``truth=False``) takes no carried-over fatigue
    (its pCTR ignores fatigue too), the population's mean tolerance (0) and the profile-interest match.

    ``estimate``: the platform's funnel probabilities of ``candidates``, computed by the caller (e.g. the
    learned pCTR/pCVR of ``gpr_sim.platform.funnel``); (N, K) each, entries of invalid candidates are
    ignored. Then eCPM, P(win), price, GMV, ``p_stay`` (with the estimate's ``match``) and ``value`` all
    come from it: the auction as that platform predicts it. Without it the estimate is the privileged
    ``platform_probabilities`` (the simulator's own form on hidden fields).

    ``auction``: the probabilities ``transition``'s auction ranks on (its ``estimate``), when the caller
    knows them; (N, K) each. Then eCPM, P(win) and price come from them and only the funnel (clicks,
    conversions, GMV, stay) from ``estimate`` or the truth: the auction is known, the funnel estimated.
    Default: the auction is ranked on ``estimate`` (or the privileged estimate), ``transition``'s default.
    """
    cfg = world.config
    # the same candidates in every row (a broadcast (1, K) -> (N, K) view, e.g. the oracle's whole catalog): every
    # per-ad field is gathered once, (1, K), and broadcast against the per-row terms, so nothing (N, K, D) or
    # (N, K) int64 is built; the values are the per-row path's (tests/test_world_score_shared.py)
    shared = candidates.dim() == 2 and candidates.shape[0] > 1 and candidates.stride(0) == 0
    ids = candidates[:1] if shared else candidates
    valid = (ids >= 0) & (ids < cfg.num_ads)
    ads = torch.where(valid, ids, torch.zeros_like(ids))
    if estimate is None:
        est = platform_probabilities(world, ads, state.user_id, slot)
    elif truth:
        raise ValueError("score got truth=True and an estimate: the truth replaces the platform's estimate")
    else:
        est = _checked_estimate(estimate, candidates)
    ranked = est if auction is None else _checked_estimate(auction, candidates)
    bid_ecpm = ecpm(world, ads, ranked)
    p_win, revenue = auction_expectations(cfg, bid_ecpm)
    if truth:
        pr = true_probabilities(world, ads, state.interest, state.user_id, state.fatigue, state.hour, slot)
        carried, tolerance = state.fatigue * cfg.fatigue_decay, world.user_tolerance[state.user_id]
    else:
        pr = est
        carried = tolerance = torch.zeros_like(state.fatigue)
    p_click = p_win * pr.p_click
    p_conv = p_click * pr.p_conversion
    gmv = p_conv * world.ad_value_mean[ads]
    p_stay = stay_probability(world, state.user_id, carried, tolerance, pr.match, p_win)
    value = weighted_reward(cfg.reward, revenue, gmv, p_click, p_conv, p_stay)
    value = value.masked_fill(~valid, float("-inf"))
    fields = (pr.p_click, pr.p_conversion, bid_ecpm, p_win, revenue, gmv, p_stay, value)
    return CandidateScores(
        *(f.expand(candidates.shape) for f in fields)
    )  # (N, K) views where a field is per ad


def _checked_estimate(estimate: Probabilities, candidates: torch.Tensor) -> Probabilities:
    """``estimate`` as ``Probabilities`` of ``candidates``' shape; ``ValueError`` naming a misshapen field."""
    fields = Probabilities._fields
    if not isinstance(estimate, tuple) or len(estimate) != len(fields):
        raise ValueError(
            f"estimate is a {type(estimate).__name__}: expected Probabilities{fields} of (N, K) tensors"
        )
    for name, t in zip(fields, estimate):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"estimate.{name} is a {type(t).__name__}: expected a tensor of the candidates' shape"
            )
        if t.shape != candidates.shape:
            raise ValueError(
                f"estimate.{name} has shape {tuple(t.shape)}: expected the candidates' {tuple(candidates.shape)}"
            )
    return Probabilities(*estimate)


def transition(
    world: World,
    state: SessionState,
    market: MarketState,
    candidates: torch.Tensor,
    grant: Grant | None = None,
    estimate: Probabilities | None = None,
) -> tuple[SessionState, MarketState, Outcome]:
    """Serve one ad request per row. ``candidates`` (N, K) int64 ad ids; invalid ids are not shown.

    ``grant`` settles the step's charges (N S of them, row-major) against the remaining budgets and
    returns the grant mask and the spend that moves the market (default ``settlement(world.config)``:
    this batch alone, by the world's ``budget_settlement`` rule). A data-parallel shard passes one that
    settles every rank's charges, so each rank's market moves by the global spend; it receives the world's
    rule as ``settle=`` unless that is the default "in_order".

    ``estimate``: the funnel probabilities the auction ranks on, of ``candidates`` ((N, K) each, as in
    ``score``; entries of invalid candidates are ignored), e.g. the platform's learned pCTR/pCVR. The
    auction's eCPM (and so the winners, prices and ``Outcome.ecpm``) comes from it; None ranks on the
    privileged ``platform_probabilities``. Clicks, conversions and the user's response always come from
    the hidden truth, whatever the auction ranked on.
    """
    cfg = world.config
    n, k = candidates.shape
    S, dev = cfg.num_slots, world.device
    keys = rng.stream_keys(state.seed, state.slot, state.counter)
    u = rng.uniforms(keys, 4 * S + 2)  # per slot: click, conversion, gmv, delay; then exit, competitor

    # --- eligibility and auction -------------------------------------------------------------
    valid = (candidates >= 0) & (candidates < cfg.num_ads)
    ads = torch.where(valid, candidates, torch.zeros_like(candidates))
    adv = world.ad_advertiser[ads]
    spent_today, active = _day_status(world, market)
    eligible = valid & active[adv] & first_occurrence(ads)
    if estimate is None:
        est = platform_probabilities(world, ads, state.user_id)
    else:
        est = _checked_estimate(estimate, candidates)
    bid_ecpm = ecpm(world, ads, est)
    winner, won, price = gsp_auction(bid_ecpm, eligible, S, effective_reserve(cfg, u[:, 4 * S + 1]))
    shown = ads.gather(1, winner)  # (N, S)
    shown_adv = world.ad_advertiser[shown]

    # --- budgets: charge per impression, within what is left (or one charge past it: overdeliver)
    remaining = market.budget - spent_today
    charge_adv = torch.where(won, shown_adv, torch.full_like(shown_adv, -1)).reshape(-1)
    settle = settlement(cfg)
    if grant is None:
        granted, spend = settle(charge_adv, price.double().reshape(-1), remaining)
    elif settle is grant_in_order:
        granted, spend = grant(charge_adv, price.double().reshape(-1), remaining)
    else:
        granted, spend = grant(charge_adv, price.double().reshape(-1), remaining, settle=settle)
    granted = granted.view(n, S)
    impression = won & granted
    revenue = torch.where(impression, price, torch.zeros_like(price))
    market = MarketState(market.tick + 1, market.budget, spent_today + spend, market.spent_total + spend)

    # --- funnel ------------------------------------------------------------------------------
    slot_pos = torch.arange(S, device=dev)[None, :]
    truth = true_probabilities(
        world, shown, state.interest, state.user_id, state.fatigue, state.hour, slot_pos
    )
    us = u[:, : 4 * S].view(n, 4, S)
    click = impression & (us[:, 0] < truth.p_click)
    converted = click & (us[:, 1] < truth.p_conversion)
    sigma = cfg.order_value_sigma
    order_value = world.ad_value_mean[shown] * torch.exp(sigma * rng.normals(us[:, 2]) - 0.5 * sigma**2)

    # --- delayed conversions -----------------------------------------------------------------
    new_step = state.step + 1
    pend_ad, pend_gmv, pend_due = state.pend_ad, state.pend_gmv, state.pend_due
    report_now = converted
    if cfg.conversion_delay_mean > 0:
        q = 1.0 / (1.0 + cfg.conversion_delay_mean)  # geometric on {0, 1, ...} with that mean
        delay = torch.floor(torch.log(us[:, 3]) / math.log(1.0 - q)).long()
        pend_ad, pend_gmv, pend_due = pend_ad.clone(), pend_gmv.clone(), pend_due.clone()
        report_now = converted.clone()
        for s in range(S):  # slots, not users: S is small
            free = pend_ad < 0
            has_free = free.any(1)
            first_free = free.to(torch.int8).argmax(1)
            defer = converted[:, s] & (delay[:, s] > 0) & has_free
            col = F.one_hot(first_free, PENDING_CONVERSIONS).bool() & defer[:, None]
            pend_ad = torch.where(col, shown[:, s : s + 1], pend_ad)
            pend_gmv = torch.where(col, order_value[:, s : s + 1], pend_gmv)
            pend_due = torch.where(col, (new_step + delay[:, s])[:, None], pend_due)
            report_now[:, s] = converted[:, s] & ~defer
    conversion = report_now
    gmv = torch.where(conversion, order_value, torch.zeros_like(order_value))

    # --- user dynamics -----------------------------------------------------------------------
    impressions = impression.sum(1)
    fatigue = state.fatigue * cfg.fatigue_decay + (impression * fatigue_added(cfg, truth.match)).sum(1)
    M, R = cfg.organic_per_request, cfg.organic_candidates
    interest = state.interest
    base = world.user_interest[state.user_id]
    pull = cfg.interest_anchor * base + cfg.click_drift * (click[..., None] * world.ad_emb[shown]).sum(1)
    organic_hist = state.organic_hist
    if M > 0:
        bits = rng.hash_bits(keys, M * R, offset=2000).view(n, M, R)
        gum = rng.uniforms(keys, M * R, offset=2000 + M * R).view(n, M, R)
        consumed = _choose_by_interest(bits, gum, interest, world.organic_emb, cfg.organic_temperature)
        pull = pull + cfg.interest_drift * (world.organic_emb[consumed] - interest[:, None]).sum(1)
        organic_hist = _push(organic_hist, consumed, torch.ones_like(consumed, dtype=torch.bool))
    interest = F.normalize(interest + pull, dim=-1)
    event = EVENT_IMPRESSION + click.long() + converted.long()
    ad_hist = _push(state.ad_hist, shown, impression)
    ad_event = _push(state.ad_event, event, impression)

    # --- session end ---------------------------------------------------------------------------
    terminated = u[:, 4 * S] < exit_probability(
        world, state.user_id, fatigue, world.user_tolerance[state.user_id]
    )
    truncated = (new_step >= cfg.max_steps) & ~terminated
    done = terminated | truncated
    due = (pend_ad >= 0) & ((pend_due <= new_step[:, None]) | done[:, None])
    delayed_conversion = due.sum(1)
    delayed_gmv = torch.where(due, pend_gmv, torch.zeros_like(pend_gmv)).sum(1)
    pend_ad = torch.where(due, torch.full_like(pend_ad, -1), pend_ad)
    pend_gmv = torch.where(due, torch.zeros_like(pend_gmv), pend_gmv)
    pend_due = torch.where(due, torch.full_like(pend_due, -1), pend_due)

    realised = weighted_reward(
        cfg.reward,
        revenue.sum(1),
        gmv.sum(1) + delayed_gmv,
        click.sum(1),
        conversion.sum(1) + delayed_conversion,
        ~terminated,
    )
    new_state = SessionState(
        seed=state.seed,
        slot=state.slot,
        counter=state.counter + 1,
        episode=state.episode,
        user_id=state.user_id,
        interest=interest,
        fatigue=fatigue,
        step=new_step,
        feed_pos=state.feed_pos + M + impressions,
        ad_load=state.ad_load + impressions,
        hour=torch.remainder(state.hour + cfg.minutes_per_request / 60.0, 24.0),
        organic_hist=organic_hist,
        ad_hist=ad_hist,
        ad_event=ad_event,
        pend_ad=pend_ad,
        pend_gmv=pend_gmv,
        pend_due=pend_due,
    )
    empty = torch.full_like(shown, -1)
    outcome = Outcome(
        ad_id=torch.where(impression, shown, empty),
        advertiser_id=torch.where(impression, shown_adv, empty),
        impression=impression,
        click=click,
        conversion=conversion,
        gmv=gmv,
        revenue=revenue,
        p_click=truth.p_click * impression,
        p_conversion=truth.p_conversion * impression,
        ecpm=torch.where(impression, bid_ecpm.gather(1, winner), torch.zeros_like(price)),
        ecpm_true=ecpm(world, shown, truth) * impression,
        match=truth.match * impression,
        is_new_ad=world.ad_is_new[shown] & impression,
        invalid=(~valid).sum(1),
        budget_capped=(won & ~granted).sum(1),
        delayed_conversion=delayed_conversion,
        delayed_gmv=delayed_gmv,
        reward=realised,
        terminated=terminated,
        truncated=truncated,
    )
    return new_state, market, outcome


def observe(world: World, state: SessionState) -> dict[str, torch.Tensor]:
    """The U/O/E/I observation of the current request of every row.

    Keys: ``user_id`` (N,), ``user`` (N, 7) profile features, ``organic`` (N, Ho) organic ids,
    ``context`` (N, 8) request context, ``ad_history`` (N, Hi) ad ids, ``ad_events`` (N, Hi) levels.
    """
    cfg = world.config
    angle = state.hour * (2.0 * math.pi / 24.0)
    context = torch.cat(
        [
            (state.feed_pos.float() / 100.0)[:, None],
            torch.sin(angle)[:, None],
            torch.cos(angle)[:, None],
            (state.ad_load.float() / 10.0)[:, None],
            (state.step.float() / cfg.max_steps)[:, None],
            F.one_hot(world.user_device[state.user_id], NUM_DEVICES).float(),
        ],
        dim=1,
    )
    return {
        "user_id": state.user_id,
        "user": world.user_features[state.user_id],
        "organic": state.organic_hist,
        "context": context,
        "ad_history": state.ad_hist,
        "ad_events": state.ad_event,
    }


class BudgetDay(NamedTuple):
    """The advertisers' ledger of the current budget day, as the next auction reads it (``budget_day``)."""

    spent_today: torch.Tensor  # (A,) float64 spend so far this day (0 at a day's first step: budgets reset)
    day_fraction: torch.Tensor  # () float64 share of the day elapsed once this step is served (pacing)
    has_budget: torch.Tensor  # (A,) bool the remaining budget covers the lowest price (the reserve)
    active: torch.Tensor  # (A,) bool has budget and, if paced, is not ahead of schedule: may bid now


def budget_day(world: World, market: MarketState) -> BudgetDay:
    """The ledger of the current budget day (reset at day boundaries) and who may bid in the next auction.

    Reads the market's spend, the budgets, the advertisers' pacing flags and the platform's own settings
    (day length, pacing slack, reserve): what a platform's spend ledger holds, no user state.
    """
    cfg = world.config
    day_step = market.tick % cfg.steps_per_day
    spent_today = torch.where(day_step == 0, torch.zeros_like(market.spent_today), market.spent_today)
    day_fraction = (day_step + 1).double() / cfg.steps_per_day
    rule = (day_fraction, cfg.pacing_slack, cfg.reserve_ecpm / 1000.0)
    unpaced = torch.zeros_like(world.advertiser_paced)  # nobody paced: the budget test alone
    has_budget = advertiser_active(market.budget, spent_today, unpaced, *rule)
    active = advertiser_active(market.budget, spent_today, world.advertiser_paced, *rule)
    return BudgetDay(spent_today, day_fraction, has_budget, active)


def _day_status(world: World, market: MarketState) -> tuple[torch.Tensor, torch.Tensor]:
    """Spend so far in the current budget day (reset at day boundaries) and who may bid now, (A,) each."""
    day = budget_day(world, market)
    return day.spent_today, day.active


def eligible_ads(world: World, market: MarketState) -> torch.Tensor:
    """(num_ads,) bool: ads whose advertiser can take part in the next auction (budget and pacing)."""
    return _day_status(world, market)[1][world.ad_advertiser]


def remaining_budget(world: World, market: MarketState) -> torch.Tensor:
    """(num_advertisers,) float64: what each advertiser can still spend in the current budget day (below 0
    by at most one charge after an overdelivered last impression, ``budget_settlement="overdeliver"``)."""
    return market.budget - _day_status(world, market)[0]


__all__ = [
    "CONTEXT_DIM",
    "CandidateScores",
    "Grant",
    "grant_in_order",
    "grant_overdeliver",
    "settlement",
    "open_market",
    "initial",
    "transition",
    "observe",
    "score",
    "eligible_ads",
    "remaining_budget",
    "BudgetDay",
    "budget_day",
    "EVENT_CLICK",
    "EVENT_CONVERSION",
]
