"""Which model the evaluated market's auction ranks on: the privileged estimate, or a fitted platform's funnel.

    attach_auction_model(env, "")                      # the default: the privileged auction (nothing attached)
    attach_auction_model(env, "runs/platform/small")   # the auction ranks on that folder's learned pCTR/pCVR
    attach_auction_model(env, "runs/hepo/pretrain/ads-v0__0/funnel/model.pt")   # or on a funnel file

A realism setting of the market (``envs.market.BatchedMarket.attach_auction``), not of an agent: every agent
of a comparison and its ``oracle_share`` states run in a market with the same auction. The path names a
platform folder (``agents.fit_platform``: its ``funnel.pt``) or a funnel file itself (``agents.hepo``'s
pipeline keeps a funnel without the other stages in ``ROOT/funnel/model.pt`` when it fits no platform:
``agents.pretraining.pipeline.reward_funnel_file``).
"""

from __future__ import annotations

from pathlib import Path

from agents.platform.folder import FUNNEL_FILE, check_platform_folder
from gpr_sim.platform.funnel import load_funnel


def auction_funnel_file(path: str) -> Path | None:
    """The funnel file ``path`` names: itself when it is a file, the ``funnel.pt`` of a platform folder, or
    None for "" (the privileged auction).

    Raises:
        ValueError: naming ``path`` when it is neither a file nor a platform folder (``check_platform_folder``).
    """
    if not isinstance(path, str):
        raise ValueError(
            f"auction={path!r} is invalid: expected a platform folder, a funnel file or '' (privileged)"
        )
    if not path:
        return None
    if Path(path).is_file():
        return Path(path)
    return check_platform_folder(path) / FUNNEL_FILE


def attach_auction_model(env, path: str) -> None:
    """Make ``env``'s auction rank on the funnel ``path`` names (``auction_funnel_file``); "" leaves it privileged.

    Raises:
        ValueError: naming the folder or file when it is not a platform folder, or its funnel is unreadable
            or of another catalog.
    """
    file = auction_funnel_file(path)
    if file is None:
        return
    vec = env.unwrapped
    try:
        model = load_funnel(file, vec.device, vec.catalog)
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{file}: not a readable funnel model ({type(e).__name__}: {e})") from None
    vec.attach_auction(model)


__all__ = ["attach_auction_model", "auction_funnel_file"]
