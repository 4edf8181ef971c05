"""Export a Parquet request log (`gpr_sim.data.logs`) as a Minari dataset (arrow storage).

    import envs                                              # registers ads-v0 (spaces, recovery)
    from gpr_sim.data.minari_export import export_minari
    ds = export_minari("runs/logs/ads-v0__cascade-privileged__0.parquet", "ads/cascade-privileged-v0")
    for episode in ds.iterate_episodes(): ...

Each logged session (`episode_id`) becomes one Minari episode of T steps:

| Minari field            | from the log                                                                  |
|-------------------------|-------------------------------------------------------------------------------|
| `observations` (T + 1)  | the ads-v0 observation dict of each request, then the `final_*` observation   |
| `actions` (T)           | `action` (Discrete, K = 1) or `candidates` (MultiDiscrete, K > 1)             |
| `rewards` (T)           | `reward`                                                                      |
| `terminations` (T)      | `terminated`                                                                  |
| `truncations` (T)       | `truncated`; also True on the last step of a session the collection cut short |
| `infos` (T + 1)         | `request_id`, `propensity`, `impression`, `click`, `conversion`, `revenue`,   |
|                         | `gmv` of step t at index t + 1 (index 0 is the reset: -1 / NaN / 0)           |

The dataset's env spec is the log's env id with the logged world config and world seed as kwargs, so
``dataset.recover_environment()`` rebuilds the same market. `minari` is an optional dependency,
imported when a function here is called; gymnasium comes with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd

from gpr_sim.data.logs import read_logs, stack_list_column

_OBS_COLUMNS = {  # ads-v0 observation key -> log column (request, final)
    "organic": ("organic_ids", "final_organic_ids"),
    "context": ("context", "final_context"),
    "ad_history": ("ad_ids", "final_ad_ids"),
    "ad_events": ("ad_events", "final_ad_events"),
}
_INFO_COLUMNS = {
    "request_id": -1,
    "propensity": np.nan,
    "impression": 0,
    "click": 0,
    "conversion": 0,
    "revenue": 0.0,
    "gmv": 0.0,
}
"""Per-step signals kept in ``infos``, with their value at the reset (index 0)."""


def _import_minari():
    try:
        import minari
    except ImportError as e:
        raise ImportError(
            "exporting to Minari needs the optional dependency `minari` (pip install 'minari>=0.5,<0.6')"
        ) from e
    return minari


@contextlib.contextmanager
def _datasets_path(path: str | os.PathLike | None):
    """Point Minari at ``path`` (it reads MINARI_DATASETS_PATH on each call) for the duration."""
    if path is None:
        yield
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def episode_buffers(df: pd.DataFrame) -> list:
    """One `minari.EpisodeBuffer` per logged session (see the module table).

    Raises:
        ValueError: If the log has no ``final_*`` observations or a session misses its first steps.
    """
    _import_minari()
    from minari.data_collector import EpisodeBuffer

    missing = [final for _, final in _OBS_COLUMNS.values() if final not in df.columns]
    if missing:
        raise ValueError(f"the log has no final observations {missing}: collect it again with agents.collect")
    order = np.lexsort((df["step"].to_numpy(), df["episode_id"].to_numpy()))
    df = df.iloc[order].reset_index(drop=True)
    episode = df["episode_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    ends = np.r_[starts[1:], len(df)]
    step = df["step"].to_numpy()
    bad = step[starts] != 0
    if bad.any():
        raise ValueError(f"sessions {episode[starts][bad][:5].tolist()} do not start at step 0 in the log")

    obs = {key: stack_list_column(df, col) for key, (col, _) in _OBS_COLUMNS.items()}
    obs["user"] = stack_list_column(df, "user_features")
    obs["user_id"] = df["user_id"].to_numpy()
    last = ends - 1
    final = {key: stack_list_column(df.iloc[last], fcol) for key, (_, fcol) in _OBS_COLUMNS.items()}
    final["user"], final["user_id"] = (
        obs["user"][last],
        obs["user_id"][last],
    )  # U tokens stay within a session
    k = len(df["candidates"].iat[0]) if len(df) else 1
    actions = df["action"].to_numpy() if k == 1 else stack_list_column(df, "candidates")
    reward = df["reward"].to_numpy()
    terminated, truncated = df["terminated"].to_numpy(), df["truncated"].to_numpy().copy()
    truncated[last] |= ~terminated[last]  # sessions the collection cut short end truncated
    info = {name: df[name].to_numpy() for name in _INFO_COLUMNS}

    buffers = []
    for i, (s, e) in enumerate(zip(starts, ends)):  # episodes, not requests: Minari takes one buffer each
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations={key: np.concatenate([v[s:e], final[key][i : i + 1]]) for key, v in obs.items()},
                actions=actions[s:e],
                rewards=reward[s:e].tolist(),
                terminations=terminated[s:e].tolist(),
                truncations=truncated[s:e].tolist(),
                # lists of scalars: minari 0.5's arrow storage cannot decode 1-D numpy infos
                infos={name: [pad, *info[name][s:e].tolist()] for name, pad in _INFO_COLUMNS.items()},
            )
        )
    return buffers


def export_minari(
    log: str | os.PathLike,
    dataset_id: str,
    *,
    env_id: str | None = None,
    datasets_path: str | os.PathLike | None = None,
    description: str | None = None,
):
    """Write the log at ``log`` as the local Minari dataset ``dataset_id`` and return it.

    Args:
        log: Parquet log from `agents.collect` (with its ``final_*`` observation columns).
        dataset_id: Minari id, ``(namespace/)(env_name/)dataset_name-v(version)``, e.g. "ads/cascade-v0".
        env_id: Registered Gymnasium id whose spaces and spec the dataset records; default: the log's
            ``env`` metadata (register it first, e.g. ``import envs``).
        datasets_path: Minari's datasets root; default: MINARI_DATASETS_PATH or ~/.minari/datasets.
        description: Free text stored with the dataset.

    Returns:
        The `minari.MinariDataset`.
    """
    minari = _import_minari()
    import gymnasium

    df, meta = read_logs(log)
    env_id = env_id or meta.get("env")
    if env_id is None:
        raise ValueError(f"{log} has no `env` metadata: pass env_id")
    kwargs = {"config": meta["world_config"], "world_seed": meta.get("world_seed", 0)}
    spec = dataclasses.replace(gymnasium.spec(env_id), kwargs=kwargs)
    with _datasets_path(datasets_path):
        return minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=episode_buffers(df),
            env=spec,
            algorithm_name=f"{meta.get('policy', 'unknown')} (temperature {meta.get('temperature')})",
            description=description or f"gpr-sim request log {Path(log).name}, seed {meta.get('seed')}",
            data_format="arrow",
        )
