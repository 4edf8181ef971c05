#!/usr/bin/env bash
# Issue 16 d6 at GPU scale, one seed per call: one gpu-large pre-training (the platform, and so the RL reward's
# learned pCTR / pCVR, fitted on 1M requests), then HEPO, PPO, GRPO and Sibling-GRPO side by side from that VAFT
# model (four fit the H200: 102 GB at peak with expandable segments; seeds 0 and 1 ran the first three), each
# keeping its best checkpoint by held-out reward per session; in the last FINAL_S seconds every run's best, the
# VAFT start and the learned cascade are evaluated on other sessions (reset seed 54321), paired by user.
# PRETRAIN shortens the profile's pre-training to fit a call (the generator's MTP then sees 131k requests, 1/8 of the
# platform's 1M); PRETRAIN="" runs the profile's own (MTP 3,000 steps on 1M requests, VAFT 1,000: issue 16 d3).
# RUNS="" runs no learner: the pre-training alone (agents.hepo --pretrain-only), then the final evaluation of MTP and
# VAFT against the learned cascade, paired against VAFT: d3's start on equal terms in one call, for when the machine
# will not stay warm between calls (the full pre-training took 454-480 s on an H200; a pre-training stage does not
# stop on SIGTERM, so GRACE=5):
#   PRETRAIN="" RUNS="" W=$PWD/runs/d3_start SEED=0 DEADLINE=592 FINAL_S=60 GRACE=5 \
#     FINAL_FLAGS="--sessions 8192 --num-envs 8192 --oracle-states 1024" OUT=$OUT bash benchmarks/results/gpu_d6/call.sh
# STOP adds a stop rule to every run (e.g. "--plateau-metric reward_per_session --plateau-patience 3").
# Usage: SEED=0 bash benchmarks/results/gpu_d6/call.sh   (RUNS, DEADLINE, FINAL_S, FINAL_FLAGS, STOP may override)
SEED=${SEED:-0}
PRETRAIN=${PRETRAIN-"--collect-steps 8 --mtp-steps 600 --vaft-steps 200"}
export PROFILE="--profile gpu-large $PRETRAIN --num-envs 8192 --rollout-steps 2 --eval-every 4 --eval-sessions 4096 --eval-envs 4096 --eval-states 512 --seed $SEED ${STOP:-}"
LEARNERS="hepo:--label hepo;ppo:--algo ppo --label ppo;grpo:--algo grpo --label grpo;sibling:--algo sibling_grpo --label sibling_grpo"
if [ -n "${CLIP_PROBE:-}" ] && [ -z "${RUNS+x}" ]; then
  # the clip probe (gpu_d3/next.sh): the learners as above (finished in an earlier call: each exits at once and the
  # final reuses its sessions), then each again as NAME_sep with the policy and the critic clipped apart, so the
  # final pairs both clips on the same users
  RUNS=$LEARNERS
  IFS=';' read -ra specs <<< "$LEARNERS"
  for spec in "${specs[@]}"; do
    flags=${spec#*:}
    RUNS="$RUNS;${spec%%:*}_sep:${flags%--label *}--grad-clip separate --label ${flags##*--label }_separate"
  done
fi
export RUNS=${RUNS-$LEARNERS}
export DEADLINE=${DEADLINE:-530}
export FINAL_S=${FINAL_S:-110}
export FINAL_FLAGS=${FINAL_FLAGS:-"--sessions 16384 --num-envs 8192 --oracle-states 2048"}
bash benchmarks/results/gpu_learned_reward/run_side_by_side.sh
