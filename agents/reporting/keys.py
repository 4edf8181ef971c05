"""The metric keys the reports read and the columns of each table: the contract between what ``agents.hepo``
logs (``metrics.jsonl``: its held-out ``agents.evaluation.heldout.Evaluator``), what ``agents.evaluate``
writes (``summary.json``, ``strata.csv``) and the tables of ``agents.reporting``.

A separate module (no pandas, no matplotlib) because both sides import it: the evaluator writes these
keys, the tables read them.
"""

from __future__ import annotations

CURVES = (
    "eval/oracle_share",
    "eval/reward_per_session",
    "eval/gmv_per_session",
    "eval/ctcvr",
    "eval/cand_mean_value",
)
"""the metrics drawn by default, one panel each (the deterministic ``oracle_share`` first: the primary curve;
a metric no run logs, e.g. oracle_share in runs older than it, gets no panel)"""
REWARD_MODEL = ("rollout/group_value_mean", "rollout/truth/group_value_mean", "rollout/truth/reward_corr")
"""the reward model's monitor (``agents.rl.rollout.truth_monitor``), every iteration: the sampled candidates'
value as rewarded, the same candidates under the simulator's truth (privileged, logged only), their within-group
correlation"""
GRADIENTS = ("train/grad_norm_policy", "train/grad_norm_critic", "train/grad_clipped")
"""the update's gradients (``agents.rl.loop.add_terms``), every iteration: the mean norm of the policy's and of the
critic's (the HTE's) gradient before the clip, and the share of minibatches whose policy step the clip scaled"""
GRADIENT_COLUMNS = tuple(key.split("/", 1)[1] for key in GRADIENTS)
"""``GRADIENTS`` as the columns of a run's row in the sweep and side-by-side tables (``folders.update_gradients``)"""
BEST_METRIC = "eval/reward_per_session"
"""what a run's best policy (``agents.hepo``'s ``OUT/best``) is chosen by: the highest realised reward per held-out
session among its evaluations (finite values only, the earliest on ties), the number an online A/B test reads"""
BEST_ITERATION = "eval/best_iteration"
"""logged with every evaluation by ``agents.hepo``: the iteration of the evaluation ``OUT/best`` holds after it
(whatever ``--best-rule`` chose); folders from before it was logged: the highest ``BEST_METRIC``"""


def margin_key(against: str) -> str:
    """The key ``agents.hepo`` logs an evaluation's paired difference in ``BEST_METRIC`` under, to the best evaluation
    before it (``against="best"``) or to the run's start (``"start"``); its interval at ``_ci_low`` / ``_ci_high``
    (``agents.evaluation.heldout.paired_margin``)."""
    return f"{BEST_METRIC}_vs_{against}"


POLICIES = ("last", "best")
"""which evaluation of a run the tables report: its last, or the one its best policy was chosen at"""
TABLE3 = ("ndcg", "opr", "mean_value", "max_value", "top1_value")
"""Table 3 columns: ``eval/cand_{name}`` of ``agents.hepo``"""
FINAL = ("reward_per_session", "gmv_per_session", "ctcvr", "revenue_per_session")
"""final-table columns: ``eval/{name}`` of ``agents.hepo``"""
PAPER_TABLE3 = {
    "MTP": {"ndcg": 0.3868, "opr": 0.5292, "mean_value": 0.2412, "max_value": 0.6201},
    "VAFT": {"ndcg": 0.3925, "opr": 0.5348},
    "+DPO": {"ndcg": 0.4383, "opr": 0.5463, "mean_value": 0.2442, "max_value": 0.6659},
    "+HEPO": {"ndcg": 0.4413, "opr": 0.5509, "mean_value": 0.2630, "max_value": 0.7619},
}
"""GPR paper, Table 3 (simulator, K = 40, normalised final_value; missing = not reported)"""
MTP_MARKER = "eval/mtp/cand_ndcg"
"""the iteration-0 key of the MTP stage's Table 3 metrics (``agents.evaluation.heldout.mtp_candidates``)"""
PAPER_METRICS = ("ndcg", "opr", "mean_value", "max_value")
"""the Table 3 columns the paper reports (``top1_value`` is ours)"""
TABLE4 = ("ctr", "cvr", "ctcvr", "gmv_per_session", "revenue_per_session", "reward_per_session")
"""Table 4 columns (GPR Table 4: CTR, CVR, CTCVR, GMV, costs): ``eval/{name}``; revenue = the advertisers' cost"""
TABLE5 = TABLE4
"""Table 5 columns (GPR Table 5: online metrics per user-activity tier and for new / old ads): Table 4's"""
STRATA = {"activity_tier": ("1", "2", "3", "4", "5"), "ad_age": ("new", "old")}
"""the strata of ``gpr_sim.metrics.summarize_strata`` and their groups, in table order"""
STRATA_METRICS = {"activity_tier": TABLE5, "ad_age": tuple(m for m in TABLE5 if m != "reward_per_session")}
"""the Table 5 metrics each stratum has: ad-age groups split the ads of a session, not the session, so
they have ``AD_METRICS`` only (no reward); every group also logs ``sessions``"""
BASELINE = "cascade-privileged"
"""the ``agents.evaluate`` agent that Tables 4 and 5 compare every stage with: the production-style cascade on
the simulator's secrets, a labelled reference like the oracle (``agents.policies.PRIVILEGED``)"""
BASELINE_NAMES = (BASELINE, "cascade")
"""the names the baseline's row may have in an ``agents.evaluate`` folder, preferred first: ``cascade`` is its
former name (``agents.policies.ALIASES``), in folders written before the rename"""
BASELINE_NOTE = "a privileged reference: it reads the simulator's hidden state"
"""the tables' footnote that labels the baseline as a reference"""
START = "VAFT"
"""stage name of the generator every algorithm starts from"""
ORDER = ("ppo", "grpo", "dpo", "hepo")
"""row order of the known algorithms (baselines first, as in GPR Table 3); others follow by name"""


def strata_key(stratum: str, group: str, metric: str, prefix: str = "eval/") -> str:
    """The flat ``metrics.jsonl`` key of one stratum group's metric, e.g. ``eval/strata/activity_tier/3/ctr``
    (``agents.evaluation.heldout.Evaluator``: the value of ``summarize_strata``, no interval; NaN for an
    empty group)."""
    return f"{prefix}strata/{stratum}/{group}/{metric}"


STRATA_MARKER = strata_key("activity_tier", "1", "sessions")
"""a key every evaluation with strata holds"""
