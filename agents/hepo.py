"""Align the pre-trained GPR generator to business value in the simulator: HEPO (GPR §4.3) and baselines.

    python -m agents.hepo --env ads-v0                       # the whole pipeline, small CPU config
    python -m agents.hepo --env ads-v0 --algo ppo --seed 1   # PPO / GRPO / Sibling-GRPO / DPO, same generator
    python -m agents.hepo --env ads-v0 --device cuda --num-envs 4096 --iterations 200

Pipeline (each stage reused when already present): the platform's bootstrap log (the privileged cascade) ->
its learned pCTR / pCVR (``ROOT/funnel``) and learned cascade (``ROOT/platform``) -> the learned cascade's log
(``--behaviour``) -> fit the RQ-Kmeans+ tokenizer -> MTP -> VAFT (``agents.pretraining.pipeline``, into ``--pretrain-dir``, shared by every algorithm of a seed so
they start from the same generator; every stage in the ``--preset`` world) -> RL. The RL loop per iteration:

    rollout (``agents.rl.rollout.Roller``: N sessions x T steps, K sampled paths per request, simulator
    scores, process rewards, ARR requests) -> targets (the algorithm's ``targets``) -> E epochs of
    minibatch updates with the algorithm's loss (``agents.rl.loop.update``) -> metrics -> evaluation
    -> checkpoint

HEPO, PPO, GRPO, Sibling-GRPO and DPO (``agents.rl.registry.ALGOS``, one file each in ``agents/rl/``) share
the rollout buffer and this loop and differ only in their targets and loss. Evaluation
(``agents.evaluation.heldout``) runs the generator (beam search, top-1 served) on held-out sessions of a separate market with a fixed
seed: reward, revenue, GMV, CTR, CVR, CTCVR per session with 95% CIs, the same per user-activity tier and
for new / old ads (Table 5, values only: ``eval/strata/...``), plus the Table 3 candidate quality (nDCG,
OPR, mean / max normalised final_value of the top-K beam) on the first requests of those sessions.

The run folder (``runs/hepo/{env}__{algo}__{seed}__{time}``, or ``--out``) holds ``config.json``,
``metrics.jsonl`` (on CUDA with each phase's peak allocated memory, ``perf/{rollout,update,eval}_peak_gib``),
``checkpoint.pt`` (model, optimiser, env and RNG state: exact resume), ``policy.pt``
(the model alone, for ``agents.evaluate --agents gpr:RUN``), ``best/`` (the policy of the evaluation with the
highest held-out reward per session so far, ``agents.rl.selection.keep_best``: ``gpr:RUN/best``), ``summary.json``, ``curves.png``,
``reward_model.png`` (the rewarded vs true value of the sampled candidates per iteration: ``agents.rl.rollout``) and
``gradients.png`` (the policy's and the critic's gradient norms before the clip, and how often it scaled). Without
``--out`` the newest unfinished run of the same env/algo/seed is resumed. The folder is locked while a run
writes it and belongs to the run that created it (``run.json``, ``gpr_sim.runs.RunFolder``): a run with other
flags (bar ``RESUME_IGNORES``) is refused, naming them, and so is a folder holding results but no checkpoint.
Resuming never rewrites ``config.json``, and a finished run asked for no more ``--iterations`` keeps its
``summary.json``. A SIGTERM during RL (``timeout``, a batch scheduler, a session's end) stops the run at the end
of its current iteration: it writes that iteration's checkpoint and ``policy.pt``, no ``summary.json``, and exits
with status 143 (``agents.rl.trainer.StopRequest``), so the same command resumes it with nothing lost (Ctrl-C stops at once).

The auction: by default the markets' auction ranks on the privileged estimate (the world's default). With
``--auction`` (needs ``--reward learned``) the training market's auction ranks on the same learned pCTR / pCVR
that rewards the learners (``agents.pretraining.pipeline.reward_funnel_file``: ``ROOT/platform/funnel.pt``, or
``ROOT/funnel/model.pt`` with ``--behaviour cascade-privileged``), and so do the held-out evaluation's market and its
``oracle_share`` states (``HeldOutConfig.auction``): the fair-arena setting in which the learned cascade is
compared with GPR (``agents.evaluate --auction``). ``config.json`` and ``summary.json`` record which auction
ran and the funnel's SHA-256 (``auction_record``); the reports refuse to put runs of different auctions in
one table (``agents.reporting.folders.check_runs``), and a run resumes only with the funnel it started on.

The run is library code (``agents.rl``: ``config`` holds ``RLConfig``, these flags, and ``PROFILES``; ``trainer`` the
run; ``selection`` the best policy and the stop rule; ``checkpoint`` the resumable state); this module parses.
"""

from __future__ import annotations

from agents.cli import parse_args, run_main
from agents.rl import distributed
from agents.rl.config import ENTRY, PROFILES, RLConfig
from agents.rl.trainer import train

Args = RLConfig
"""CLI of ``python -m agents.hepo``: one flag per field (``--loss.*`` flags set the loss constants)."""


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) one RL run; returns the summary (also ``OUT/summary.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel (``agents.rl.trainer.train``); every rank returns
    the summary rank 0 wrote.
    """
    return distributed.launch(train, parse_args(Args, argv, __doc__, PROFILES, entry=ENTRY))


if __name__ == "__main__":
    run_main(main)
