"""What a platform may know (``view``) and the models it learns from its logs.

``gpr_sim.platform`` imports ``gpr_sim.world`` and torch only: policies, the env and the trainers all read
the boundary from here.
"""

from gpr_sim.platform.funnel import (
    CatalogSpec,
    FunnelConfig,
    FunnelModel,
    fit_funnel,
    funnel_examples,
    load_funnel,
    save_funnel,
)
from gpr_sim.platform.view import (
    HIDDEN_SESSION_FIELDS,
    HIDDEN_WORLD_FIELDS,
    OBSERVABLE_SESSION_FIELDS,
    OBSERVABLE_WORLD_FIELDS,
    Catalog,
    catalog_of,
    estimate_interest,
    observable_session,
)

__all__ = [
    "CatalogSpec",
    "FunnelConfig",
    "FunnelModel",
    "fit_funnel",
    "funnel_examples",
    "load_funnel",
    "save_funnel",
    "HIDDEN_SESSION_FIELDS",
    "HIDDEN_WORLD_FIELDS",
    "OBSERVABLE_SESSION_FIELDS",
    "OBSERVABLE_WORLD_FIELDS",
    "Catalog",
    "catalog_of",
    "estimate_interest",
    "observable_session",
]
