#!/usr/bin/env bash
# Issue 16 d3, seed 0, on the profile's own pre-training, as one command for every call of a warm chain (the run
# folders live in the checkout's ignored runs/d3, kept while the machine is held; it is released 30 s after a call):
# - no finished pre-training there (a fresh machine): the pre-training, then the final evaluation of MTP and VAFT
#   against the learned cascade and the privileged cascade, paired against VAFT (the d3 start, self-contained);
# - else: HEPO, PPO, GRPO and Sibling-GRPO from that VAFT model (resumed from their checkpoints in a later call),
#   then the final evaluation of every run's best beside the same agents, paired against HEPO's best; the
#   sessions of agents already evaluated with the same flags are reused.
# Usage (on the device, in $OUT's call): OUT=$OUT bash benchmarks/results/gpu_d3/next.sh
export W=$PWD/runs/d3 SEED=0 PRETRAIN="" FINAL_FLAGS="--sessions 16384 --num-envs 8192 --oracle-states 1024"
if [ -f $W/pre/vaft/summary.json ]; then
  DEADLINE=${DEADLINE:-585} FINAL_S=${FINAL_S:-140} bash benchmarks/results/gpu_d6/chain.sh
else
  RUNS="" DEADLINE=${DEADLINE:-590} FINAL_S=60 GRACE=5 bash benchmarks/results/gpu_d6/chain.sh
fi
