#!/usr/bin/env bash
# fp8 against bf16 on one GPU (issue 21's targets), in about 5 minutes:
#   1. tests/test_fp8.py's accelerator test: the fp8 products run as fp8 GEMMs (not upcast);
#   2. benchmark rows of the 7B shape cut to 16 layers, bf16 then model.fp8=true
#      (target: fp8 tokens/s >= 1.25x bf16's);
#   3. 100 steps of the tiny config on the embedded corpus in bf16, then with fp8 on the same
#      tokenizer and data (target: fp8's losses within 1% of bf16's).
# Benchmark rows are appended to $OUT/bench.jsonl (the bf16 row is gpu_check.sh's
# 7b_l16_b8_save_dots when that ran first), the comparison goes to $OUT/fp8.json; a summary is
# printed last. Usage (repo root): bash tools/fp8_check.sh, or from tools/gpu_check.sh, whose
# OUT and PYTHONPATH it inherits. FP8_BENCH (benchmark flags) and FP8_TINY_STEPS shrink it for a
# CPU dry run: FP8_BENCH=--config=configs/tiny.py FP8_TINY_STEPS=40 bash tools/fp8_check.sh
set -u
OUT=${OUT:-/tmp/jaxllm_gpu}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
PY=${PYTHON:-python3}
BENCH=${FP8_BENCH:---config=configs/7b.py --config.model.n_layers=16 \
  --config.train.global_batch_size=8 --config.model.remat=save_dots}
TINY_STEPS=${FP8_TINY_STEPS:-100}

if [ -z "${FP8_ROWS:-}" ]; then
JAXLLM_TEST_ACCELERATOR=1 timeout 180 $PY -m pytest -q -m accelerator tests/test_fp8.py 2>&1 \
  | tail -3 | tee "$OUT/fp8_tests.txt"
fi

# FP8_ROWS="BF16_NAME FP8_NAME": rows gpu_check.sh already wrote to bench.jsonl (its accelerator
# tests include test_fp8.py): compared, not rerun.
if [ -n "${FP8_ROWS:-}" ]; then
  read -r bf16_row fp8_row <<< "$FP8_ROWS"
  grep "\"name\": \"$bf16_row\"" "$OUT/bench.jsonl" | tail -1 > "$OUT/fp8_bench_bf16.json"
  grep "\"name\": \"$fp8_row\"" "$OUT/bench.jsonl" | tail -1 > "$OUT/fp8_bench_fp8.json"
fi
for mode in bf16 fp8; do
  [ -n "${FP8_ROWS:-}" ] && break
  fp8=false; [ $mode = fp8 ] && fp8=true
  # tools/gpu_check.sh's bf16 row of the same shape, when it ran just before: reused, not rerun.
  row=$OUT/7b_l16_b8_save_dots.log
  if [ $mode = bf16 ] && [ -z "${FP8_BENCH:-}" ] && grep -qs '^{' "$row"; then
    grep '^{' "$row" | tail -1 > "$OUT/fp8_bench_bf16.json"
    continue
  fi
  # shellcheck disable=SC2086  # BENCH is a list of flags
  timeout ${BENCH_TIMEOUT:-200} $PY tools/benchmark.py --steps=${STEPS:-8} --warmup=2 $BENCH \
    --config.model.fp8=$fp8 > "$OUT/fp8_bench_$mode.log" 2>&1
  grep '^{' "$OUT/fp8_bench_$mode.log" | tail -1 | tee -a "$OUT/bench.jsonl" \
    > "$OUT/fp8_bench_$mode.json"
done

# The fp8 run reads the tokenizer and the dataset the bf16 run built: the same tokens, same order.
TINY=$OUT/fp8_tiny; rm -rf "$TINY"
for mode in bf16 fp8; do
  fp8=false; shared=()
  if [ $mode = fp8 ]; then
    fp8=true
    shared=(--config.data.tokenizer="$TINY/bf16/tokenizer.model"
            --config.data.cache_dir="$TINY/bf16/data")
  fi
  timeout ${TINY_TIMEOUT:-300} $PY -m jaxllm.main --config=configs/tiny.py \
    --workdir="$TINY/$mode" \
    --config.train.num_steps="$TINY_STEPS" --config.model.dtype=bfloat16 --config.model.fp8=$fp8 \
    --config.train.sample_tokens=0 --config.checkpoint.every=0 ${shared[@]+"${shared[@]}"} \
    > "$OUT/fp8_tiny_$mode.log" 2>&1 || echo "tiny $mode run failed (rc=$?): see its log"
done

$PY - "$OUT" "$TINY_STEPS" <<'PY'
import json, pathlib, re, sys
out, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])

def bench(mode):
  path = out / f'fp8_bench_{mode}.json'
  text = path.read_text().strip() if path.exists() else ''
  row = json.loads(text) if text else None
  return None if row is None or 'failed' in row else row

def losses(mode):
  log = (out / f'fp8_tiny_{mode}.log').read_text()
  train = re.findall(rf'step {steps}/{steps} \| loss ([\d.]+)', log)
  ev = re.findall(rf'eval at step {steps}: loss ([\d.]+)', log)
  return (float(train[-1]) if train else None), (float(ev[-1]) if ev else None)

result = {}
b16, b8 = bench('bf16'), bench('fp8')
for name, r in (('bf16', b16), ('fp8', b8)):
  if r:
    print(f"{name:5} {r['config']} L={r['n_layers']} batch={r['global_batch']} remat={r['remat']}: "
          f"{r['tokens_per_s_per_device']:,.0f} tok/s/device, MFU {100 * (r['mfu'] or 0):.1f}% "
          f"(of the bf16 peak), step {r['step_s']['median']:.3f} s, peak "
          f"{(r['peak_memory_bytes'] or 0) / 2**30:.1f} GiB")
  else:
    print(f'{name:5} benchmark FAILED: see {out}/fp8_bench_{name}.log')
if b16 and b8:
  ratio = b8['tokens_per_s'] / b16['tokens_per_s']
  result['tokens_per_s_ratio'] = ratio
  print(f"fp8 / bf16 tokens/s: {ratio:.3f} (target >= 1.25): {'PASS' if ratio >= 1.25 else 'FAIL'}")
(t16, e16), (t8, e8) = losses('bf16'), losses('fp8')
result.update(steps=steps, train_loss_bf16=t16, train_loss_fp8=t8, eval_loss_bf16=e16,
              eval_loss_fp8=e8)
for what, a, b in (('train loss', t16, t8), ('eval loss', e16, e8)):
  if a is None or b is None:
    print(f'{what} at step {steps}: missing (bf16 {a}, fp8 {b}); see {out}/fp8_tiny_*.log')
    continue
  rel = abs(b - a) / a
  result[f"{what.replace(' ', '_')}_rel_diff"] = rel
  print(f"{what} at step {steps}: bf16 {a:.4f}, fp8 {b:.4f}, relative difference {100 * rel:.2f}% "
        f"(target <= 1%): {'PASS' if rel <= 0.01 else 'FAIL'}")
(out / 'fp8.json').write_text(json.dumps(result) + '\n')
PY
