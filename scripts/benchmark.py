"""Speed and memory of the editing methods: seconds per image, compile time, UNet evaluations, peak memory.

    python scripts/benchmark.py --models tiny,sd15 --steps 10 --size 256 --json benchmark.json

For each model and method it compiles the encode / invert / edit / decode functions (timed
separately), then times full edits (inversion included) and reports:

* ``s_per_image``: wall time per image after compilation (median of ``--repeats``);
* ``unet_evals``: UNet image-evaluations per image, and ``s_per_unet_eval``;
* ``bookkeeping_overhead``: (s_per_unet_eval of the method / s_per_unet_eval of ddim) - 1, the
  cost of attention recording, mixing and mask statistics relative to the UNet work
  (target: <= 0.15);
* ``peak_bytes``: device peak memory where the backend reports it (GPU/TPU), else the
  compiled program's temp + argument size from XLA's memory analysis;
* ``single_pass_vs_two_pass``: how far the one-pass mixup moves the edit from the official two-pass one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csg_jax.editing import csg  # noqa: E402
from csg_jax.editing.config import EditConfig  # noqa: E402
from csg_jax.editing.editor import Editor, batch_prompts, plan_prompts  # noqa: E402

METHODS = {
    "ddim": dict(method="ddim"),
    "csg-no-mixup": dict(method="csg-no-mixup"),
    "csg": dict(method="csg"),
    "csg-single-pass": dict(method="csg", mixup="single-pass"),
}


def build_pipeline(name: str, dtype):
    from csg_jax.pipeline import load_pipeline
    from csg_jax.testing import make_random_pipeline, make_tiny_model, sd15_configs

    if name == "tiny":
        return load_pipeline(make_tiny_model(tempfile.mkdtemp(prefix="bench_tiny_")), dtype=dtype)
    if name == "sd15":
        return make_random_pipeline(sd15_configs(), dtype=dtype)
    return load_pipeline(name, dtype=dtype)


def peak_bytes(compiled) -> dict:
    out = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    except Exception:
        pass
    try:
        ma = compiled.memory_analysis()
        out["compiled_temp_bytes"] = int(ma.temp_size_in_bytes)
        out["compiled_argument_bytes"] = int(ma.argument_size_in_bytes)
    except Exception:
        pass
    return out


def bench_method(pipe, image, plan, config: EditConfig, repeats: int, batch: int) -> tuple[dict, np.ndarray]:
    latent_hw = (image.shape[1] // pipe.downsample, image.shape[2] // pipe.downsample)
    editor = Editor(pipe, config, latent_hw)
    prompts = batch_prompts(pipe, [plan] * batch)
    images = jnp.asarray(np.repeat(image, batch, axis=0))
    knobs = csg.Knobs.from_config(config)
    params = pipe.params

    t0 = time.perf_counter()
    c_encode = editor._encode.lower(params, images, None).compile()
    x0 = c_encode(params, images, None)
    c_invert = editor._invert.lower(params, x0, prompts.source).compile()
    x_T = c_invert(params, x0, prompts.source)
    c_edit = editor._edit.lower(params, x_T, prompts, knobs).compile()
    out = c_edit(params, x_T, prompts, knobs)
    c_decode = editor._decode.lower(params, out["edited"]).compile()
    jax.block_until_ready(c_decode(params, out["edited"]))
    compile_s = time.perf_counter() - t0  # includes one run of each (small next to compilation)

    times, phase = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        x0 = jax.block_until_ready(c_encode(params, images, None))
        t1 = time.perf_counter()
        x_T = jax.block_until_ready(c_invert(params, x0, prompts.source))
        t2 = time.perf_counter()
        out = jax.block_until_ready(c_edit(params, x_T, prompts, knobs))
        t3 = time.perf_counter()
        jax.block_until_ready(c_decode(params, out["edited"]))
        t4 = time.perf_counter()
        times.append(t4 - t0)
        phase = {"encode_s": t1 - t0, "invert_s": t2 - t1, "edit_s": t3 - t2, "decode_s": t4 - t3}
    s = statistics.median(times) / batch
    evals = csg.unet_evaluations(config)
    row = {
        "s_per_image": s,
        "compile_s": compile_s,
        "unet_evals": evals,
        "unet_evals_per_step": csg.unet_evaluations_per_step(config),
        "s_per_unet_eval": s / evals,
        "images_per_s": 1.0 / s,
        "last_phase_times_s": phase,
        **peak_bytes(c_edit),
    }
    return row, np.asarray(out["edited"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,sd15", help="comma list: tiny, sd15 (random SD-1.5-shaped), or model folders")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="image side for sd15 (tiny uses 32)")
    p.add_argument("--tiny-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default="benchmark.json")
    args = p.parse_args(argv)

    dtype = getattr(jnp, args.dtype)
    report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "host": platform.node(),
              "cpu_count": os.cpu_count(), "steps": args.steps, "dtype": args.dtype, "batch": args.batch, "results": {}}
    print(f"device: {report['device']}  steps: {args.steps}  dtype: {args.dtype}  batch: {args.batch}")
    for model in args.models.split(","):
        t0 = time.perf_counter()
        pipe = build_pipeline(model, dtype)
        size = args.tiny_size if model == "tiny" else args.size
        rng = np.random.RandomState(0)
        image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
        plan = plan_prompts(pipe, "a photo of a cat on the grass", task="cat2dog")
        print(f"\n{model}: {size}px, built in {time.perf_counter() - t0:.1f}s")
        print(f"{'method':<18}{'s/image':>10}{'compile s':>11}{'UNet evals':>12}{'s/eval':>10}{'overhead':>10}{'peak MB':>10}")
        rows, edits = {}, {}
        for name in args.methods.split(","):
            config = EditConfig(num_steps=args.steps, **METHODS[name])
            rows[name], edits[name] = bench_method(pipe, image, plan, config, args.repeats, args.batch)
        base = rows.get("ddim")
        for name, row in rows.items():
            if base:
                row["bookkeeping_overhead"] = row["s_per_unet_eval"] / base["s_per_unet_eval"] - 1.0
            peak = row.get("device_peak_bytes") or (row.get("compiled_temp_bytes", 0) + row.get("compiled_argument_bytes", 0))
            print(f"{name:<18}{row['s_per_image']:>10.3f}{row['compile_s']:>11.1f}{row['unet_evals']:>12}"
                  f"{row['s_per_unet_eval']:>10.4f}{row.get('bookkeeping_overhead', float('nan')):>+10.1%}{peak / 2**20:>10.0f}")
        if "csg" in edits and "csg-single-pass" in edits:
            d = np.abs(edits["csg"] - edits["csg-single-pass"])
            scale = float(np.abs(edits["csg"]).mean())
            rows["single_pass_vs_two_pass"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "mean_abs_latent": scale}
            print(f"single-pass vs two-pass edit latents: mean |diff| {d.mean():.4f} (max {d.max():.4f}; mean |latent| {scale:.3f})")
        report["results"][model] = {"size": size, **rows}
        del pipe
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
