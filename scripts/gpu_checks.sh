#!/usr/bin/env bash
# The device checks for one H100 / H200, as one script (repo root; no install: PYTHONPATH=.).
# About 8 minutes in all (TOTAL_S, default 470 s); each step gets what is left, so a slow step
# cuts the later ones short instead of the whole run. Everything lands flat in $OUT:
#
#   env.txt              nvidia-smi, JAX version and devices, XLA flags in force
#   aot_device.json      per program: XLA's memory_analysis() on this GPU vs the allocator's peak
#                        (memory_stats()['peak_bytes_in_use']) after one run, the inversion and the
#                        CSG edit at batch 16; one process each
#   blowup.json          the configuration that once ran out of memory (256 px, 10 steps, fp32, b1)
#                        with the defaults; if that fails, again with autotuning off (tells them apart)
#   benchmark_gpu.json   scripts/benchmark.py, SD-1.5 shapes, 512 px, 50 steps, bf16: csg at batch
#                        1 / 4 / 16, then ddim and p2p: images/s, compile s, peak bytes
#   gpu_checks.log       everything printed
#
# DRY=1 rehearses on the CPU with the tiny model (32 px, 3 steps, fp32) to check the plumbing.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-470}
WORK=$(mktemp -d)
LOG="$OUT/gpu_checks.log"
START=$(date +%s)
if [ "${DRY:-0}" = 1 ]; then
  MODEL=tiny SIZE=32 STEPS=3 DT=float32 SMALL_SIZE=32 SMALL_STEPS=3 MEM="--memory-gib 4"
  BATCHES="2" BENCH_BATCHES=1,2
else
  MODEL=sd15 SIZE=512 STEPS=50 DT=bfloat16 SMALL_SIZE=256 SMALL_STEPS=10 MEM=""
  BATCHES="16" BENCH_BATCHES=1,4,16
fi

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() {  # step SECONDS_MAX cmd...: run with a timeout of min(SECONDS_MAX, time left)
  local cap=$1; shift
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "skipped (time is up): $*" | tee -a "$LOG"; return 0; fi
  echo "+ [$t s] $*" | tee -a "$LOG"
  timeout "$t" "$@" 2>&1 | grep -v "^W0000\|^I0000" | tee -a "$LOG"
}

{
  date; nvidia-smi || echo "no nvidia-smi"
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# 1. the compiler's memory against the allocator's, one program per process (the peak is per process)
for prog in invert edit:csg; do
  for b in $BATCHES; do
    step 75 $PY scripts/aot_report.py --target device --run --model $MODEL --size $SIZE --steps $STEPS \
      --dtype $DT --param-dtype $DT --programs $prog --batch $b $MEM --json "$WORK/aot_${prog/:/_}_b$b.json"
  done
done

# 2. the earlier out-of-memory configuration with the defaults; if it fails, again with autotuning off
step 70 $PY scripts/aot_report.py --target device --run --model $MODEL --size $SMALL_SIZE --steps $SMALL_STEPS \
  --dtype float32 --param-dtype float32 --programs invert,edit:csg $MEM --json "$WORK/blowup_default.json"
if ! grep -q '"ok": true' "$WORK/blowup_default.json" 2>/dev/null; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  step 70 $PY scripts/aot_report.py --target device --run --model $MODEL --size $SMALL_SIZE --steps $SMALL_STEPS \
    --dtype float32 --param-dtype float32 --programs invert,edit:csg $MEM --json "$WORK/blowup_no_autotune.json"
fi

# 3. throughput: csg first (the target), ddim and p2p after (JSON rewritten after every row, so a cut-off run keeps what it measured)
step 240 $PY scripts/benchmark.py --models $MODEL --size $SIZE --tiny-size $SIZE --steps $STEPS --dtype $DT \
  --param-dtype $DT --repeats 1 --methods csg,ddim,p2p --batch $BENCH_BATCHES --json "$OUT/benchmark_gpu.json"

$PY - "$WORK" "$OUT" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1:]
def merge(pattern, name):
    rows = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, pattern)))}
    with open(os.path.join(out, name), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"{name}: {len(rows)} runs")
    for key, rep in rows.items():
        for r in rep.get("results", []):
            peak, total = r.get("device_peak_bytes"), r.get("total_bytes")
            if peak and total:
                print(f"  {key} {r['program']} b{r['batch']}: peak {peak / 2**30:.2f} GiB, compiled {total / 2**30:.2f} GiB,"
                      f" ratio {peak / total:.2f}, run {r.get('run_s') or 0:.2f} s")
merge("aot_*.json", "aot_device.json")
merge("blowup_*.json", "blowup.json")
EOF
echo "total $(( $(date +%s) - START )) s" | tee -a "$LOG"
ls -la "$OUT"
