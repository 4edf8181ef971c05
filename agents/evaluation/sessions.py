"""Run a policy on a vector env until every env slot has its sessions: the one session loop of evaluation.

``agents.evaluate`` (every agent of a comparison) and the held-out evaluation of an RL run
(``agents.evaluation.heldout``) both collect their sessions here, so a session means the same in both.
"""

from __future__ import annotations

import pandas as pd
import torch
from tqdm import tqdm

from gpr_sim.metrics import SessionAccumulator

CHECK_EVERY = 8
"""steps between host syncs that update the progress bar and test for completion"""


def collect_sessions(
    env, policy, sessions_per_slot: int, seed: int, desc: str = "", progress: bool = True
) -> tuple[pd.DataFrame, int]:
    """Run ``policy`` from ``env.reset(seed)`` until every slot has ``sessions_per_slot`` sessions.

    Each slot records its first ``sessions_per_slot`` completed sessions (``gpr_sim.metrics.SessionAccumulator``:
    a fixed number per slot, so short sessions are not favoured); the loop syncs with the host only every
    ``CHECK_EVERY`` steps.

    Args:
        env: an ads-v0 vector env (``envs.make_vec_env``) with N slots.
        policy: anything with ``act(obs) -> PolicyOutput`` (``agents.policies``).
        sessions_per_slot: completed sessions recorded per slot.
        seed: the reset seed (the same first users for every policy).
        desc: progress-bar label, also named in the error.
        progress: show the progress bar.

    Returns:
        The session records (one row per session, ``gpr_sim.metrics.SESSION_COLUMNS``) and the number of
        env steps taken.
    """
    vec = env.unwrapped
    obs, _ = env.reset(seed=seed)
    acc = SessionAccumulator(
        env.num_envs, vec.world.user_activity, sessions_per_slot, ad_value_mean=vec.world.ad_value_mean
    )
    limit = sessions_per_slot * vec.config.max_steps  # a session is truncated at max_steps at the latest
    bar = tqdm(
        total=env.num_envs * sessions_per_slot, desc=desc, unit="session", leave=False, disable=not progress
    )
    steps = 0
    with torch.no_grad():
        while steps < limit:
            action = policy.act(obs).action
            obs, _, terminated, truncated, info = env.step(action)
            acc.update(info, terminated, truncated)
            steps += 1
            if steps % CHECK_EVERY == 0 or steps == limit:  # the loop's only host syncs
                bar.update(int(acc.num_sessions()) - bar.n)
                if bool(acc.complete()):
                    break
    bar.close()
    if not bool(acc.complete()):
        raise RuntimeError(f"{desc}: sessions did not end within {limit} steps")
    return acc.records(), steps
