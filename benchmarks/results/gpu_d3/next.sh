#!/usr/bin/env bash
# Issue 16 d3 on the profile's own pre-training, one command per device call (SEED, default 0):
# - no pre-training at hand (a fresh machine, no BUNDLE_IN): the gpu-large pre-training, packed into $OUT as
#   pre_bundle.* parts (benchmarks/pretrain_bundle.py: the VAFT weights in bf16, the tokenizer, the platform,
#   38.9 MiB in three parts), then what time is left of the final evaluation of MTP and VAFT against the learned
#   cascade and the privileged cascade, paired against VAFT (16,384 sessions);
# - BUNDLE_IN=DIR (those parts copied into the checkout and carried) or a warm machine's runs/d3_s$SEED: HEPO, PPO,
#   GRPO and Sibling-GRPO (RUNS overrides) from that VAFT model, then the final evaluation of every run's best
#   beside the VAFT start and the cascades on 65,536 sessions, paired against the first run's best.
# The machine is usually released between calls (2 of 6 chained calls so far found it warm), hence the
# bundle; a warm machine's W is reused (its pre-training exactly, its runs resumed).
# Usage (device):  OUT=$OUT bash benchmarks/results/gpu_d3/next.sh                      (carry .whl)
#                  BUNDLE_IN=runs/bundle_s0 OUT=$OUT bash benchmarks/results/gpu_d3/next.sh (carry .whl, runs/bundle_s0)
#                  ... CACHE_IN=runs/cache ... (carry runs/cache too: a learner call's inductor.tgz.* parts)
export SEED=${SEED:-0}
export W=$PWD/runs/d3_s$SEED PRETRAIN=""
if [ -f $W/pre/vaft/summary.json ] || [ -n "${BUNDLE_IN:-}" ]; then
  # - early stopping: no new best held-out reward per session in 3 evaluations (12 iterations); seed 0's learners
  #   peaked at iterations 4-8 and only fell after, so a run ends near iteration 20 (or at the call's cut);
  # - the compiled kernels come back (inductor.tgz.NN; ~130 s of the first iteration with four learners compiling
  #   at once): carried as CACHE_IN=DIR with the bundle, the next learner call skips most of it;
  # - the final evaluation on the issue's >= 65k sessions per seed: simulating 65,536 sessions takes 8-12 s an agent
  #   on an H200, the whole evaluation of 7 agents (2,048 states) took 164 s in d6 seed 2 (16,384 sessions: 81 s)
  export FINAL_FLAGS=${FINAL_FLAGS:-"--sessions 65536 --num-envs 8192 --oracle-states 1024"}
  STOP=${STOP-"--plateau-metric reward_per_session --plateau-patience 3"} CACHE_OUT=${CACHE_OUT-1} \
    DEADLINE=${DEADLINE:-585} FINAL_S=${FINAL_S:-200} bash benchmarks/results/gpu_d6/chain.sh
else
  export FINAL_FLAGS=${FINAL_FLAGS:-"--sessions 16384 --num-envs 8192 --oracle-states 1024"}
  # the pre-training eager and in fp32 (agents.hepo --pretrain-precision's default): compiling it is unmeasured on
  # the GPU; fp32 eager took 490-515 s of this call's 590, bf16 eager 422 s but cost MTP HitRate (RESULTS.md)
  PRETRAIN="--compile off" RUNS="" BUNDLE_OUT=1 DEADLINE=${DEADLINE:-590} FINAL_S=60 GRACE=5 \
    bash benchmarks/results/gpu_d6/chain.sh
fi
