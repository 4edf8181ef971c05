"""A platform folder: the three learned stages of a cascade, fitted from one log (``python -m agents.fit_platform``).

| file | what | written by |
|---|---|---|
| `funnel.pt` | the learned pCTR/pCVR ranker (``gpr_sim.platform.funnel``) | ``save_funnel`` |
| `retrieval.pt` | the two-tower retrieval model (``gpr_sim.platform.retrieval``) | ``save_torch`` |
| `preranking.pt` | the pre-ranker distilled from the ranker (``gpr_sim.platform.preranking``) | ``save_torch`` |
| `report.json`, `report.md` | fit diagnostics and the stage losses measured in the simulator | ``write_report`` |

``load_platform`` reads the three models (safe loading: no code from the files runs) and fails with one
line naming the folder and what is missing or unreadable.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from gpr_sim.platform import funnel as funnel_module
from gpr_sim.platform import preranking, retrieval
from gpr_sim.runs import load_torch, save_torch

FUNNEL_FILE = "funnel.pt"
RETRIEVAL_FILE = "retrieval.pt"
PRERANKING_FILE = "preranking.pt"
MODEL_FILES = (FUNNEL_FILE, RETRIEVAL_FILE, PRERANKING_FILE)
"""the files a learned cascade reads (what a cache of its results is keyed by)"""
REPORT_FILES = ("report.json", "report.md")


class Platform(NamedTuple):
    """The three learned stages of a cascade."""

    funnel: torch.nn.Module  # gpr_sim.platform.funnel.FunnelModel: the ranker's pCTR / pCVR
    retrieval: retrieval.TwoTower
    preranking: preranking.PreRanker


def platform_inputs(path: str | Path) -> list[Path]:
    """The model files of the platform folder ``path`` (they need not exist yet)."""
    return [Path(path) / name for name in MODEL_FILES]


def platform_fitted(path: str | Path) -> bool:
    """Whether the folder ``path`` holds every model file of a platform (``MODEL_FILES``)."""
    return all(file.is_file() for file in platform_inputs(path))


def check_platform_folder(path: str | Path) -> Path:
    """``path`` as a Path if it is a folder holding every ``MODEL_FILES``.

    Raises:
        ValueError: one line naming the folder and the missing files.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{folder}: not a platform folder (expected the output of python -m agents.fit_platform)"
        )
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{folder}: not a platform folder, it lacks {', '.join(missing)} (write one with python -m agents.fit_platform)"
        )
    return folder


def save_platform(platform: Platform, path: str | Path) -> None:
    """Write the three models into ``path`` atomically, one file each."""
    folder = Path(path)
    funnel_module.save_funnel(platform.funnel, folder / FUNNEL_FILE)
    save_torch(
        folder / RETRIEVAL_FILE,
        retrieval.FORMAT,
        retrieval.VERSION,
        retrieval.retrieval_payload(platform.retrieval),
    )
    save_torch(
        folder / PRERANKING_FILE,
        preranking.FORMAT,
        preranking.VERSION,
        preranking.preranking_payload(platform.preranking),
    )


def load_platform(path: str | Path, device: str | torch.device = "cpu") -> Platform:
    """The three models of a platform folder on ``device``, in eval mode.

    Raises:
        ValueError: one line naming the folder or file: not a folder, a file missing, unreadable, or of
            another format or version.
    """
    folder = check_platform_folder(path)
    try:
        funnel = funnel_module.load_funnel(folder / FUNNEL_FILE, device)
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(
            f"{folder / FUNNEL_FILE}: not a readable funnel model ({type(e).__name__}: {e})"
        ) from None
    payload = load_torch(
        folder / RETRIEVAL_FILE,
        retrieval.FORMAT,
        retrieval.VERSION,
        "a retrieval model",
        ("config", "emb_dim", "request_dim", "state_dict"),
    )
    ret = _build(folder / RETRIEVAL_FILE, retrieval.retrieval_from_payload, payload, device)
    payload = load_torch(
        folder / PRERANKING_FILE,
        preranking.FORMAT,
        preranking.VERSION,
        "a pre-ranking model",
        ("config", "state_dict"),
    )
    pre = _build(folder / PRERANKING_FILE, preranking.preranking_from_payload, payload, device)
    return Platform(funnel.eval(), ret, pre)


def _build(path: Path, build, payload: dict, device):
    """A model from a checked payload; a config or weights that do not fit -> one line naming the file."""
    try:
        return build(payload, device)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its model does not load ({first[:200]})") from None


__all__ = [
    "FUNNEL_FILE",
    "MODEL_FILES",
    "PRERANKING_FILE",
    "REPORT_FILES",
    "RETRIEVAL_FILE",
    "Platform",
    "check_platform_folder",
    "load_platform",
    "platform_fitted",
    "platform_inputs",
    "save_platform",
]
