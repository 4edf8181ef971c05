#!/usr/bin/env bash
# Which Inductor setting stops the batch-dynamic regions from recompiling on CUDA (issue 16 d2). Inductor's
# mix-order reduction (torch/_inductor/scheduler.py, MixOrderReduction.can_fuse) decides whether to fuse two
# reductions of opposite loop orders (a norm's backward) from the batch size, with evaluate_expr: each decision
# becomes a guard (nrow * ncol >= 5 * 2**20, nrow >= 4096, ...), and a batch on the other side compiles again.
# One process per setting (no compiled code shared), the same bench_rl_iteration row, TORCH_LOGS=recompiles:
#   off        triton.mix_order_reduction = False (no mix-order fusion)
#   nonstrict  triton.mix_order_reduction_non_strict_mode = True (fuse without the size checks: no guards)
#   default    torch's defaults (the code as it was: the guards)
# Usage (device): OUT=$OUT bash benchmarks/results/compile_cuda/mix_order.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles
F=${F:-"--device cuda --sessions 8192 --precision bf16 --compile regions --ffn-layout segments --optimizer fused --warmup 3 --iters 3"}
start=$(date +%s)
for v in ${VARIANTS:-off nonstrict default}; do
  left=$((${BUDGET:-480} - ($(date +%s) - start)))
  [ $left -lt 30 ] && { echo "$v: not run, ${left} s left"; continue; }
  t=$(( left < ${EACH:-170} ? left : ${EACH:-170} ))
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$v timeout $t python - $F --out $OUT/$v.json > $OUT/$v.log 2>&1 <<PY
import runpy, sys
import torch, torch._inductor.config as c
v = "$v"
if v == "off":
    c.triton.mix_order_reduction = False
elif v == "nonstrict":
    if not hasattr(c.triton, "mix_order_reduction_non_strict_mode"):
        sys.exit(f"torch {torch.__version__}: no triton.mix_order_reduction_non_strict_mode")
    c.triton.mix_order_reduction_non_strict_mode = True
print("torch", torch.__version__, "variant", v, "mix_order_reduction", c.triton.mix_order_reduction, flush=True)
sys.argv = ["bench_rl_iteration.py", *sys.argv[1:]]
runpy.run_path("benchmarks/bench_rl_iteration.py", run_name="__main__")
PY
  echo "$v rc=$? in $(($(date +%s) - start)) s, recompiles: $(grep -c 'Recompiling' $OUT/$v.log)"
done
for v in ${VARIANTS:-off nonstrict default}; do echo "== $v"; grep -v "__recompiles\|^V1" $OUT/$v.log | tail -8; done
