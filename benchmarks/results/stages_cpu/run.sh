#!/usr/bin/env bash
# MTP < VAFT < HEPO on the CPU demo config: each seed's MTP and VAFT generators (the sweep's shared pre-training)
# and HEPO's best checkpoint (lr 1e-4, learned reward) evaluated on the same 1,024 sessions per agent (reset seed
# 54321) and 1,024 fixed oracle states, paired by user against HEPO's best. Needs runs/sweep_best (the
# "best checkpoint" section's sweep). Run from the repository root with the venv active.
P=runs/sweep_best/pretrain/51b46f13e7
for s in 0 1 2 3 4; do
  H="gpr:runs/sweep_best/learned/hepo/lr0.0001/seed$s/best@beam_width=8"
  python -m agents.evaluate --preset small --agents "gpr:$P/seed$s/mtp@beam_width=8,gpr:$P/seed$s/vaft@beam_width=8,$H" \
    --reference "$H" --sessions 1024 --num-envs 256 --oracle-states 1024 --seed 54321 \
    --threads 1 --no-plots --out runs/stages/seed$s
done
