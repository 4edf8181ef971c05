"""The platform view's boundary covers the world and the session exactly once, and the interest estimate
reads the observable history only."""

from __future__ import annotations

import dataclasses

import torch

from gpr_sim.platform import (
    HIDDEN_SESSION_FIELDS,
    HIDDEN_WORLD_FIELDS,
    OBSERVABLE_SESSION_FIELDS,
    OBSERVABLE_WORLD_FIELDS,
    catalog_of,
    estimate_interest,
)
from gpr_sim.world import WorldConfig
from gpr_sim.world.catalog import World, generate_world
from gpr_sim.world.state import EVENT_CLICK, EVENT_CONVERSION, EVENT_IMPRESSION, EVENT_PAD, SessionState

BOOKKEEPING = {"seed", "slot", "counter", "episode"}


def test_every_world_field_is_observable_or_hidden_once():
    fields = {f.name for f in dataclasses.fields(World)} - {"config"}
    observable, hidden = set(OBSERVABLE_WORLD_FIELDS), set(HIDDEN_WORLD_FIELDS)
    assert not observable & hidden
    assert observable | hidden == fields


def test_every_session_field_is_observable_hidden_or_bookkeeping_once():
    observable, hidden = set(OBSERVABLE_SESSION_FIELDS), set(HIDDEN_SESSION_FIELDS)
    assert not observable & hidden and not (observable | hidden) & BOOKKEEPING
    assert observable | hidden | BOOKKEEPING == set(SessionState._fields)


def test_catalog_holds_no_hidden_tensor():
    world = generate_world(WorldConfig(num_ads=20, num_organic=30, num_users=10, num_advertisers=4), seed=0)
    catalog = catalog_of(world)
    assert {f.name for f in dataclasses.fields(catalog)} == set(OBSERVABLE_WORLD_FIELDS)
    assert catalog.num_ads == 20 and catalog.num_organic == 30 and catalog.num_advertisers == 4


def test_estimated_interest_weights_organic_and_engaged_ads_by_hand():
    world = generate_world(WorldConfig(num_ads=20, num_organic=30, num_users=10, num_advertisers=4), seed=1)
    catalog = catalog_of(world)
    organic = torch.tensor([[-1, 3, 5], [-1, -1, -1]])
    ads = torch.tensor([[7, 8, 9, -1], [2, -1, 4, 6]])
    events = torch.tensor(
        [
            [EVENT_IMPRESSION, EVENT_CLICK, EVENT_CONVERSION, EVENT_PAD],
            [EVENT_IMPRESSION, EVENT_PAD, EVENT_IMPRESSION, EVENT_IMPRESSION],
        ]
    )
    est = estimate_interest(catalog, organic, ads, events)
    first = world.organic_emb[3] + world.organic_emb[5] + 2.0 * world.ad_emb[8] + 3.0 * world.ad_emb[9]
    torch.testing.assert_close(est[0], first / first.norm())
    torch.testing.assert_close(est[1], torch.zeros(world.ad_emb.shape[1]))  # shown only: no estimate
