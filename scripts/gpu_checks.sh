#!/usr/bin/env bash
# The device checks, as one script (run from the repo root on a lent GPU machine):
#   1. train the shapes model (scripts/gpu_train_shapes.sh, BUDGET seconds),
#   2. benchmark the editing methods on the SD-1.5-shaped random model (256 px, 10 steps, fp32).
# Everything lands flat in $OUT.
set -u
OUT=${OUT:-/tmp/out}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  BUDGET=${BUDGET:-330} SAMPLE_S=${SAMPLE_S:-60} bash scripts/gpu_train_shapes.sh
fi
timeout ${BENCH_S:-200} python3 scripts/benchmark.py --models sd15 --size 256 --steps 10 --repeats 2 \
  --methods ddim,csg-no-mixup,csg,csg-single-pass --json "$OUT/benchmark_gpu.json"
ls -la "$OUT"
