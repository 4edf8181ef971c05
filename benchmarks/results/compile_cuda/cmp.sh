python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONUNBUFFERED=1
F="--device cuda --sessions 8192 --precision bf16 --compile regions --ffn-layout segments --optimizer fused --warmup 1 --iters 2"
PYTHONPATH=/tmp/site:$PWD TORCH_LOGS=recompiles timeout 140 python benchmarks/bench_rl_iteration.py $F --out $OUT/new.json > $OUT/new.log 2>&1; echo "new rc=$?"
cd old_code && PYTHONPATH=/tmp/site:$PWD TORCH_LOGS=recompiles timeout 140 python benchmarks/bench_rl_iteration.py $F --out $OUT/old.json > $OUT/old.log 2>&1; echo "old rc=$?"
grep -c "Recompiling" $OUT/new.log $OUT/old.log; tail -6 $OUT/new.log $OUT/old.log
