#!/usr/bin/env bash
# each run's OUT/best under the two rules, on other sessions (reset seed 54321), paired; only where they differ
cd "$(dirname "$0")/../../.." && source .venv/bin/activate
for a in hepo ppo grpo; do for s in 0 1 2 3 4; do
  h=runs/margin/${a}_s$s; r=runs/margin_resolved/${a}_s$s
  hi=$(python -c "import json;print(json.load(open('$h/summary.json'))['best']['iteration'])")
  ri=$(python -c "import json;print(json.load(open('$r/summary.json'))['best']['iteration'])")
  echo "$a $s highest=$hi resolved=$ri"
  [ "$hi" = "$ri" ] && continue
  python -m agents.evaluate --env ads-v0 --agents "gpr:$h/best,gpr:$r/best" --reference "gpr:$h/best" \
    --seed 54321 --sessions 2048 --num-envs 512 --oracle-states 512 --threads 2 --no-plots \
    --out runs/margin_eval/${a}_s$s > runs/margin_eval_${a}_s$s.log 2>&1
  echo "  rc=$?"
done; done
echo done > runs/margin_eval/DONE
