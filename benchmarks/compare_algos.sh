#!/usr/bin/env bash
# The issue-5 comparison: HEPO vs PPO / GRPO / DPO on the same generator, ablations, baselines, then the tables.
#   bash benchmarks/compare_algos.sh [ROOT] [SEEDS] [JOBS]      (defaults: runs/compare "0 1 2" 16)
# Every run is `python -m agents.hepo` with the default config and one flag changed; runs of a seed share
# its MTP/VAFT stages. Processes use one torch thread each and run JOBS at a time. Tables and figures go
# to ROOT/plots (agents.plots: Table 3 and Table 4 analogues, the latter vs the cascade-privileged reference of ROOT/baselines).
set -euo pipefail
ROOT=${1:-runs/compare}
SEEDS=${2:-"0 1 2"}
JOBS=${3:-16}
PY=${PYTHON:-python}
LABELS="hepo ppo grpo dpo hepo_no_arr hepo_no_process hepo_no_budget"  # the RL runs of step 2, one folder each
mkdir -p "$ROOT"
# 1) pre-training per seed (collect -> tokenizer -> MTP -> VAFT), in parallel over seeds
for s in $SEEDS; do
  echo "$PY -m agents.hepo --seed $s --iterations 1 --eval-every 1 --threads 1 --no-progress --pretrain-dir $ROOT/pretrain/seed$s --out $ROOT/warmup/seed$s"
done | xargs -P "$JOBS" -I{} bash -c "{} > /dev/null"
# 2) SB3 PPO (first: one process runs its seeds in turn), the baselines, then the RL runs and HEPO ablations
{
  # SB3 PPO on the flat single env (ad-index actions, not a generator): not in the generator tables; its
  # own held-out evaluation vs random (ROOT/sb3_ppo/seedS/summary.json) is copied beside them in step 3
  for s in $SEEDS; do  # one job per seed: a seed takes ~4 min on one core, in turn they would gate step 3
    echo "OMP_NUM_THREADS=1 $PY -m agents.sb3_ppo --env ads-v0 --seeds $s --out $ROOT/sb3_ppo/seed$s"
  done
  # random / cascade-privileged / oracle on the agents.hepo Evaluator's held-out sessions (its defaults: the env's
  # default world, 128 slots x ceil(256 / 128) sessions, reset seed eval_seed 12345): Table 4's cascade
  echo "$PY -m agents.evaluate --env ads-v0 --preset small --agents random,cascade-privileged,oracle --num-envs 128 --sessions 256 --seed 12345 --threads 1 --out $ROOT/baselines"
  for s in $SEEDS; do
    common="--seed $s --threads 1 --no-progress --pretrain-dir $ROOT/pretrain/seed$s"
    echo "$PY -m agents.hepo $common --algo hepo --out $ROOT/hepo/seed$s"
    echo "$PY -m agents.hepo $common --algo ppo --out $ROOT/ppo/seed$s"
    echo "$PY -m agents.hepo $common --algo grpo --out $ROOT/grpo/seed$s"
    echo "$PY -m agents.hepo $common --algo dpo --out $ROOT/dpo/seed$s"
    echo "$PY -m agents.hepo $common --algo hepo --no-arr --label hepo_no_arr --out $ROOT/hepo_no_arr/seed$s"
    echo "$PY -m agents.hepo $common --algo hepo --no-loss.process-rewards --label hepo_no_process --out $ROOT/hepo_no_process/seed$s"
    echo "$PY -m agents.hepo $common --algo hepo --no-budget-aware --label hepo_no_budget --out $ROOT/hepo_no_budget/seed$s"
  done
} | xargs -P "$JOBS" -I{} bash -c "{} >> $ROOT/jobs.log 2>&1 || echo 'FAILED: {}' | tee -a $ROOT/jobs.log"
echo "runs done: $(ls -d "$ROOT"/*/seed* | wc -l)"
# 3) tables and figures of the RL runs (not the warm-up runs), Table 4 against cascade-privileged; SB3 PPO beside them
runs=()
for label in $LABELS; do
  for s in $SEEDS; do runs+=("$ROOT/$label/seed$s"); done
done
$PY -m agents.plots "${runs[@]}" --baseline "$ROOT/baselines" --out "$ROOT/plots"
for s in $SEEDS; do cp "$ROOT/sb3_ppo/seed$s/summary.json" "$ROOT/plots/sb3_ppo_summary_seed$s.json"; done
echo "SB3 PPO on the flat env (reward per session vs random, its own held-out users): $ROOT/plots/sb3_ppo_summary_seed*.json"
cat "$ROOT"/plots/sb3_ppo_summary_seed*.json
