#!/usr/bin/env bash
# Every GPU check in one call (device time is scarce): accelerator tests, then benchmarks of the
# 1B config (bf16, seq 4096) over per-device batch and remat, and of the 7B shape cut to the
# layers that fit one GPU. JSON lines go to $OUT/bench.jsonl; a table is printed last.
# Usage (on the GPU host, repo root): bash tools/gpu_check.sh   [wheels for missing packages in .whl/]
set -u
OUT=${OUT:-/tmp/jaxllm_gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, grain, tensorflow_datasets, ml_collections, clu; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tail -1

JAXLLM_TEST_ACCELERATOR=1 timeout 180 python3 -m pytest -q -m accelerator tests/test_accelerator.py 2>&1 | tail -3 | tee "$OUT/accelerator_tests.txt"

bench() {  # name, then config overrides
  local name=$1; shift
  timeout ${BENCH_TIMEOUT:-150} python3 tools/benchmark.py --steps=${STEPS:-8} --warmup=2 "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$? line; line=$(grep '^{' "$OUT/$name.log" | tail -1)
  if [ -n "$line" ]; then echo "$line" >> "$OUT/bench.jsonl"; else
    echo "{\"name\": \"$name\", \"failed\": \"rc=$rc $(grep -E 'Error|error|RESOURCE' "$OUT/$name.log" | tail -1 | tr -d '"\\' | cut -c1-200)\"}" >> "$OUT/bench.jsonl"; fi
}
# Baselines at the batches measured before, then train.loss_chunk (fused chunked head + loss: no
# [batch, seq, 128k] float32 logits) at the larger batches it should make room for.
bench 1b_b8_save_dots --config=configs/1b.py --config.train.global_batch_size=8 --config.model.remat=save_dots
bench 1b_b8_save_dots_lc1024 --config=configs/1b.py --config.train.global_batch_size=8 --config.model.remat=save_dots --config.train.loss_chunk=1024
bench 1b_b16_save_dots_lc1024 --config=configs/1b.py --config.train.global_batch_size=16 --config.model.remat=save_dots --config.train.loss_chunk=1024
bench 1b_b24_save_dots_lc512 --config=configs/1b.py --config.train.global_batch_size=24 --config.model.remat=save_dots --config.train.loss_chunk=512
bench 7b_l16_b8_save_dots --config=configs/7b.py --config.model.n_layers=16 --config.train.global_batch_size=8 --config.model.remat=save_dots
bench 7b_l16_b12_save_dots_lc1024 --config=configs/7b.py --config.model.n_layers=16 --config.train.global_batch_size=12 --config.model.remat=save_dots --config.train.loss_chunk=1024

python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
print(f"{'config':8} {'L':>3} {'batch':>5} {'remat':10} {'chunk':>5} {'attn':6} {'tok/s/dev':>10} {'MFU':>6} {'step s':>7} {'compile':>7} {'peak GiB':>8}")
for line in open(sys.argv[1]):
  r = json.loads(line)
  if 'failed' in r:
    print(r['name'], 'FAILED', r['failed']); continue
  mem = (r['peak_memory_bytes'] or 0) / 2**30
  print(f"{r['config']:8} {r['n_layers']:>3} {r['global_batch']:>5} {r['remat']:10} {r.get('loss_chunk', 0):>5} {r['attention']:6} "
        f"{r['tokens_per_s_per_device']:>10,.0f} {100 * (r['mfu'] or 0):>5.1f}% {r['step_s']['median']:>7.3f} "
        f"{r['compile_s']:>7.1f} {mem:>8.1f}")
PY
