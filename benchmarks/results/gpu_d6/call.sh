#!/usr/bin/env bash
# Issue 16 d6 at GPU scale, one seed per call: one gpu-large pre-training (the platform, and so the RL reward's
# learned pCTR / pCVR, fitted on 1M requests), then HEPO, PPO and GRPO side by side from that VAFT model, each
# keeping its best checkpoint by held-out reward per session; in the last FINAL_S seconds every run's best, the
# VAFT start and the learned cascade are evaluated on other sessions (reset seed 54321), paired by user.
# Usage: SEED=0 bash benchmarks/results/gpu_d6/call.sh   (RUNS, DEADLINE, FINAL_S, FINAL_FLAGS may override)
SEED=${SEED:-0}
export PROFILE="--profile gpu-large --collect-steps 8 --mtp-steps 600 --vaft-steps 200 --num-envs 8192 --rollout-steps 2 --eval-every 4 --eval-sessions 4096 --eval-envs 4096 --eval-states 512 --seed $SEED"
export RUNS=${RUNS:-"hepo:--label hepo;ppo:--algo ppo --label ppo;grpo:--algo grpo --label grpo"}
export DEADLINE=${DEADLINE:-530}
export FINAL_S=${FINAL_S:-110}
export FINAL_FLAGS=${FINAL_FLAGS:-"--sessions 16384 --num-envs 8192 --oracle-states 2048"}
bash benchmarks/results/gpu_learned_reward/run_side_by_side.sh
