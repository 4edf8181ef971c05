"""The ad auction and budget accounting. No randomness: every function here can be worked by hand.

Candidates compete on platform-estimated eCPM (``1000 * bid * pCTR_hat * pCVR_hat``). The top
``num_slots`` eligible candidates above the reserve win the slots in order; each pays the generalized
second price: the eCPM of the candidate one rank below (or the reserve), per impression (/1000).
"""

from __future__ import annotations

import torch


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """(N, K) ids -> (N, K) bool, True where the id did not appear earlier in its row."""
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    dup_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return ~torch.zeros_like(dup_sorted).scatter(1, order, dup_sorted)


def gsp_auction(
    ecpm: torch.Tensor, eligible: torch.Tensor, num_slots: int, reserve_ecpm: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generalized second-price auction for each request.

    Args:
        ecpm: (N, K) platform-estimated eCPM of each candidate.
        eligible: (N, K) bool, candidates allowed to compete.
        num_slots: S, slots per request (S <= K).
        reserve_ecpm: minimum eCPM to win, and the floor of every price: a float, or (N,) per request
            (the platform reserve raised by external competing demand).

    Returns:
        winner: (N, S) int64 candidate index per slot (0 where the slot is empty).
        won: (N, S) bool, the slot is filled.
        price: (N, S) price per impression (0 where empty).
    """
    n, k = ecpm.shape
    if isinstance(reserve_ecpm, torch.Tensor):
        reserve_ecpm = reserve_ecpm.to(ecpm.dtype)[:, None]  # (N, 1) broadcasts over candidates/slots
    live = eligible & (ecpm >= reserve_ecpm)
    score = ecpm.masked_fill(~live, float("-inf"))
    depth = min(num_slots + 1, k)
    top_val, top_idx = score.topk(depth, dim=1)  # (N, depth), descending
    won = torch.isfinite(top_val[:, :num_slots])
    if depth > num_slots:
        runner_up = top_val[:, 1 : num_slots + 1]
    else:  # K == S: the last slot has no runner-up among candidates
        pad = torch.full((n, 1), float("-inf"), dtype=ecpm.dtype, device=ecpm.device)
        runner_up = torch.cat([top_val[:, 1:], pad], dim=1)
    price_ecpm = torch.maximum(runner_up, torch.as_tensor(reserve_ecpm, dtype=ecpm.dtype, device=ecpm.device))
    price = torch.where(won, price_ecpm / 1000.0, torch.zeros_like(price_ecpm))
    winner = torch.where(won, top_idx[:, :num_slots], torch.zeros_like(top_idx[:, :num_slots]))
    return winner, won, price


def advertiser_active(
    budget: torch.Tensor,
    spent_today: torch.Tensor,
    paced: torch.Tensor,
    day_fraction: torch.Tensor,
    slack: float,
    min_charge: float = 0.0,
) -> torch.Tensor:
    """(A,) bool: the advertiser can still pay ``min_charge`` and, if paced, is not ahead of schedule.

    Pacing is spend-ratio throttling: a paced advertiser sits out while the share of its daily budget
    already spent exceeds the share of the day elapsed plus ``slack``. An advertiser whose remaining
    budget cannot cover the lowest possible price (the reserve) has run dry and drops out.
    """
    has_budget = (budget - spent_today) >= min_charge
    has_budget &= spent_today < budget
    on_schedule = spent_today <= (day_fraction + slack) * budget
    return has_budget & (~paced | on_schedule)


def _spend_in_order(
    advertiser: torch.Tensor, charge: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Charges grouped by advertiser in request order, with each one's running total of its group.

    Returns (valid (M,), order (M,) the stable sort by advertiser, a (M,) sorted advertiser (0 for no
    charge), before (M,) the group's total of the earlier charges (exactly 0 for a group's first),
    within (M,) the group's total up to and including the charge), all but ``valid`` in sorted order.
    """
    valid = advertiser >= 0
    adv = torch.where(valid, advertiser, torch.zeros_like(advertiser))
    amount = torch.where(valid, charge, torch.zeros_like(charge))
    order = torch.argsort(adv, stable=True)
    a, c = adv[order], amount[order]
    cum = torch.cumsum(c, 0)
    first = torch.ones_like(a, dtype=torch.bool)
    first[1:] = a[1:] != a[:-1]
    # Running total before each group starts; cum is non-decreasing so a running max propagates it.
    group_base = torch.cummax(torch.where(first, cum - c, torch.zeros_like(cum)), 0).values
    before = torch.where(first, torch.zeros_like(cum), (cum - c) - group_base)
    return valid, order, a, before, cum - group_base


def cap_to_budget(advertiser: torch.Tensor, charge: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """Which charges fit in the advertisers' remaining budgets, serving them in order.

    Many requests of one batch can be won by the same advertiser at once. Charges are granted in
    request order while the advertiser's running total stays within its remaining budget; once a
    charge would exceed it, that and later charges of the same advertiser in this step are refused.
    So spend never exceeds budget, whatever the batch size.

    Args:
        advertiser: (M,) int64 advertiser of each charge (-1 = no charge).
        charge: (M,) non-negative amounts (float64 recommended).
        remaining: (A,) remaining budget per advertiser.

    Returns:
        (M,) bool, True where the charge is granted (always True for advertiser -1).
    """
    valid, order, a, _, within = _spend_in_order(advertiser, charge)
    ok_sorted = within <= remaining[a]
    ok = torch.empty_like(ok_sorted).scatter_(0, order, ok_sorted)
    return ok | ~valid


def overdeliver_to_budget(
    advertiser: torch.Tensor, charge: torch.Tensor, remaining: torch.Tensor
) -> torch.Tensor:
    """Which charges are served under bounded overdelivery: while the spend before them is below budget.

    As requests served one after another against a budget counter that is checked before each one: a
    charge is granted while the advertiser's running total of the earlier granted charges (request
    order) is below its remaining budget, so the last granted charge may overshoot it. The overshoot of
    an advertiser in one settlement is below its largest granted charge, and an advertiser already at or
    past its budget (remaining <= 0) is granted nothing, so over a budget day spend stays below budget
    plus one charge. Same arguments and result as ``cap_to_budget``.
    """
    valid, order, a, before, _ = _spend_in_order(advertiser, charge)
    ok_sorted = before < remaining[a]
    ok = torch.empty_like(ok_sorted).scatter_(0, order, ok_sorted)
    return ok | ~valid
