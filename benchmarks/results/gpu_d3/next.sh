#!/usr/bin/env bash
# Issue 16 d3 on the profile's own pre-training, one command per device call (SEED, default 0):
# - no pre-training at hand (a fresh machine, no BUNDLE_IN): the gpu-large pre-training, packed into $OUT as
#   pre_bundle.* parts (benchmarks/pretrain_bundle.py: the VAFT weights in bf16, the tokenizer, the platform,
#   an estimated 35-40 MiB), then the final evaluation of MTP and VAFT against the learned cascade and the privileged cascade,
#   paired against VAFT (the d3 start, self-contained);
# - BUNDLE_IN=DIR (those parts copied into the checkout and carried) or a warm machine's runs/d3: HEPO, PPO, GRPO
#   and Sibling-GRPO (RUNS overrides) from that VAFT model, then the final evaluation of every run's best beside
#   the VAFT start and the cascades, paired against the first run's best.
# The machine is released 30 s after a call: in two sessions no chained call found it warm, hence the bundle.
# Usage (device):  OUT=$OUT bash benchmarks/results/gpu_d3/next.sh                      (carry .whl)
#                  BUNDLE_IN=runs/bundle_s0 OUT=$OUT bash benchmarks/results/gpu_d3/next.sh (carry .whl, runs/bundle_s0)
#                  ... CACHE_IN=runs/cache ... (carry runs/cache too: a learner call's inductor.tgz.* parts)
export SEED=${SEED:-0}
export W=$PWD/runs/d3_s$SEED PRETRAIN="" FINAL_FLAGS="--sessions 16384 --num-envs 8192 --oracle-states 1024"
if [ -f $W/pre/vaft/summary.json ] || [ -n "${BUNDLE_IN:-}" ]; then
  # early stopping: no new best held-out reward per session in 3 evaluations (12 iterations); seed 0's learners
  # peaked at iterations 4-8 and only fell after, so the runs end near iteration 20 and the final evaluation fits
  # and the compiled kernels come back (inductor.tgz.NN; ~130 s of the first iteration with four learners
  # compiling at once): carried as CACHE_IN=DIR with the bundle, the next learner call skips most of it
  STOP=${STOP-"--plateau-metric reward_per_session --plateau-patience 3"} CACHE_OUT=${CACHE_OUT-1} \
    DEADLINE=${DEADLINE:-585} FINAL_S=${FINAL_S:-160} bash benchmarks/results/gpu_d6/chain.sh
else
  # the pre-training eager and in fp32 (agents.hepo --pretrain-precision's default): compiling it is unmeasured on
  # the GPU; fp32 eager took 490-515 s of this call's 590, bf16 eager 422 s but cost MTP HitRate (RESULTS.md)
  PRETRAIN="--compile off" RUNS="" BUNDLE_OUT=1 DEADLINE=${DEADLINE:-590} FINAL_S=60 GRACE=5 \
    bash benchmarks/results/gpu_d6/chain.sh
fi
