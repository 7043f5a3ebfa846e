#!/usr/bin/env bash
# Train the shapes model on a GPU machine in one go; run from the repo root:
#
#     BUDGET=400 bash scripts/gpu_train_shapes.sh
#
# BUDGET: seconds for scripts/train_shapes.py from its start (pool rendering, compile, training,
# final export all included). Afterwards a sample grid + colour-adherence check runs (<= SAMPLE_S
# seconds, default 90; SAMPLE_S=0 skips it). Works without installing the package (PYTHONPATH=.).
#
# EXTRA_ARGS / SAMPLE_ARGS are appended to the trainer's / sampler's arguments (later flags win),
# e.g. EXTRA_ARGS="--dtype bfloat16" or, for a CPU rehearsal, EXTRA_ARGS="--pool-size 512".
#
# Results in $OUT (flat, few files, so all of them come back from a device run):
#   shapes_model.tar     the diffusers-format export (EMA weights, fp16), rewritten at every export,
#                        so a run cut off early still leaves the last one; untar -> shapes_model/
#   train_log.jsonl      (step, loss, elapsed, lr, grad_norm) lines + start / fit_schedule / export / end events
#   train_stdout.txt     the trainer's console output
#   samples.png          64 samples (guidance 5, 50 DDIM steps) of held-out captions
#   sample_metrics.json  colour adherence of those samples (background / object colour match rate)
#   env.txt              nvidia-smi, versions, devices
set -u -o pipefail

OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-400}
SAMPLE_S=${SAMPLE_S:-90}
BATCH=${BATCH:-256}
CKPT=${CKPT:-/tmp/shapes_ckpt}
EXPORT=${EXPORT:-/tmp/export/shapes_model}   # the folder itself stays off $OUT (too many files, too deep)
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "safetensors", "numpy", "tqdm", "PIL"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name} MISSING ({type(e).__name__}: {e})")
import jax
print("devices", jax.devices())
EOF
} 2>&1 | tee "$OUT/env.txt"

python3 scripts/train_shapes.py \
  --out "$CKPT" --export "$EXPORT" --export-tar "$OUT/shapes_model.tar" --log "$OUT/train_log.jsonl" \
  --batch-size "$BATCH" --steps 30000 --time-budget-s "$BUDGET" --pool-size 100000 --export-every 120 \
  ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/train_stdout.txt"
rc=${PIPESTATUS[0]}
echo "train_shapes.py exit code $rc"

if [ "$SAMPLE_S" -gt 0 ] && [ -f "$EXPORT/model_index.json" ]; then
  timeout "$SAMPLE_S" python3 -m csg_jax.shapes.sample --model "$EXPORT" --out "$OUT/samples.png" \
    --json "$OUT/sample_metrics.json" -n 64 ${SAMPLE_ARGS:-} \
    || echo "sampling failed or timed out (the model in shapes_model.tar is unaffected)"
fi
ls -la "$OUT"
exit "$rc"
