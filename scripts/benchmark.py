"""Speed and memory of the editing methods: seconds per image, compile time, UNet evaluations, peak memory.

    python scripts/benchmark.py --models tiny,sd15 --steps 10 --size 256 --json benchmark.json
    python scripts/benchmark.py --dataset --models tiny --steps 10 --batch-sizes 1,2,4,8 --json bench_dataset.json

For each model and method it compiles the encode / invert / edit / decode functions (timed
separately), then times full edits (inversion included) and reports:

* ``s_per_image``: wall time per image after compilation (median of ``--repeats``);
* ``unet_evals``: UNet image-evaluations per image (CSG: 4 per target step where the source maps
  are stored, ``source_maps_stored``; 5 where they are recomputed), and ``s_per_unet_eval``;
* ``pct_of_flop_limit``: UNet GFLOP per evaluation (XLA cost analysis) / s_per_unet_eval over
  ``--peak-gflops`` (the whole edit's time counted as UNet time: VAE and bookkeeping included);
* ``peak_rss_gb_so_far``: the process's peak resident memory after the row (monotone: run one
  method per process for a per-method figure);
* ``bookkeeping_overhead``: (s_per_unet_eval of the method / s_per_unet_eval of ddim) - 1, the
  cost of attention recording, mixing and mask statistics relative to the UNet work
  (target: <= 0.15);
* ``peak_bytes``: device peak memory where the backend reports it (GPU/TPU), else the
  compiled program's temp + argument size from XLA's memory analysis;
* ``single_pass_vs_two_pass``: how far the one-pass mixup moves the edit from the official two-pass one;
* ``pix2pix_zero_vs_csg``: Pix2Pix-Zero's time per image over CSG's (and the UNet-evaluation ratio; a
  backward pass through the UNet counts as ``costs.BACKWARD_COST`` = 2 evaluations).
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

from csg_jax import io, runtime  # noqa: E402

runtime.add_xla_flags()  # the GPU flags the csg_jax commands run with (before JAX's backend starts)

from csg_jax.editing import costs  # noqa: E402,F401  (costs.BACKWARD_COST, in the docstring)
from csg_jax.editing.config import EditConfig, Knobs  # noqa: E402
from csg_jax.editing.editor import Editor, method_knobs, plan_prompts, prepare_prompts  # noqa: E402

METHODS = {
    "ddim": dict(method="ddim"),
    "csg-no-mixup": dict(method="csg-no-mixup"),
    "csg": dict(method="csg"),  # two-pass mixup (official); source maps stored where they fit the budget
    "csg-recompute": dict(method="csg", max_attention_store_gb=0.0),  # same, maps recomputed (memory flat in steps)
    "csg-official-inversion": dict(method="csg", inversion="official"),  # + the authors' N-2 step inversion
    "csg-single-pass": dict(method="csg", mixup="single-pass"),
    "p2p": dict(method="p2p"),  # the paper's comparison setting (cost does not depend on the guidance)
    "pix2pix-zero": dict(method="pix2pix-zero"),  # backprop through the UNet counted as 2 evaluations
}


def build_pipeline(name: str, dtype, param_dtype=jnp.float32):
    from csg_jax.pipeline import load_pipeline
    from csg_jax.testing import make_random_pipeline, make_tiny_model, sd15_configs

    if name == "tiny":
        return load_pipeline(make_tiny_model(tempfile.mkdtemp(prefix="bench_tiny_")), dtype=dtype, param_dtype=param_dtype)
    if name == "sd15":
        return make_random_pipeline(sd15_configs(), dtype=dtype, param_dtype=param_dtype)
    return load_pipeline(name, dtype=dtype, param_dtype=param_dtype)


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
    prompts = prepare_prompts(pipe, [plan] * batch, config)
    images = jnp.asarray(np.repeat(image, batch, axis=0))
    knobs = Knobs.from_config(config)
    extra = method_knobs(config)  # P2P / Pix2Pix-Zero array settings (None otherwise)
    params = pipe.params

    # Compile from abstract shapes (nothing runs), so compile_s is compilation alone and the timed
    # repeats are the only executions: on a CPU an SD-1.5-sized edit takes minutes per run.
    shape = lambda f, *a: jax.eval_shape(f, *a)
    t0 = time.perf_counter()
    c_encode = editor.lower("encode", params, images).compile()
    x0 = shape(editor.jitted("encode"), params, images)
    c_invert = editor.lower("invert", params, x0, prompts.source).compile()
    x_T = shape(editor.jitted("invert"), params, x0, prompts.source)
    c_edit = editor.lower("edit", params, x_T, prompts, knobs, extra).compile()
    edited = shape(editor.jitted("edit"), params, x_T, prompts, knobs, extra)["edited"]
    c_decode = editor.lower("decode", params, edited).compile()
    compile_s = time.perf_counter() - t0

    times, phase = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        x0 = jax.block_until_ready(c_encode(params, images))
        t1 = time.perf_counter()
        x_T = jax.block_until_ready(c_invert(params, x0, prompts.source))
        t2 = time.perf_counter()
        out = jax.block_until_ready(c_edit(params, x_T, prompts, knobs, extra))
        t3 = time.perf_counter()
        jax.block_until_ready(c_decode(params, out["edited"]))
        t4 = time.perf_counter()
        times.append(t4 - t0)
        phase = {"encode_s": t1 - t0, "invert_s": t2 - t1, "edit_s": t3 - t2, "decode_s": t4 - t3}
    s = statistics.median(times) / batch
    counts = editor.unet_evaluations(batch)
    evals = counts["total"]
    row = {
        "s_per_image": s,
        "compile_s": compile_s,
        "unet_evals": evals,
        "unet_evals_per_step": counts["per_step"],
        "source_maps_stored": editor.stores_source_maps(batch),
        "s_per_unet_eval": s / evals,
        "images_per_s": 1.0 / s,
        "last_phase_times_s": phase,
        "peak_rss_gb_so_far": _peak_rss_gb(),
        **peak_bytes(c_edit),
    }
    return row, np.asarray(out["edited"])


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def unet_gflop(pipe, latent_hw, dtype) -> float:
    """GFLOP of one UNet image-evaluation, from XLA's cost analysis of a batch-1 call."""
    x = jax.ShapeDtypeStruct((1, *latent_hw, pipe.unet.config.in_channels), dtype)
    ctx = jax.ShapeDtypeStruct((1, 77, pipe.unet.config.cross_attention_dim), dtype)
    fn = jax.jit(lambda p, x, c: pipe.unet.apply({"params": p}, x, jnp.int32(500), c)[0])
    ca = fn.lower(pipe.params["unet"], x, ctx).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return float(ca.get("flops", 0.0)) / 1e9


def bench_dataset(args) -> dict:
    """Images/s of dataset runs (``DatasetRun``: loading, sharded batches, writing) per batch size.

    Per model and batch size B: ``--dataset-batches`` global batches of B x devices items
    (shapes-world PNGs with a recolour task, written to a temp folder). A first run compiles (and
    is reported as ``compile_run_s``); a second run on the same items into a fresh output folder
    reuses the compiled program and gives ``images_per_s`` (end to end: read, plan, compute,
    write) and ``steady_images_per_s`` (after its first batch).
    """
    import shutil

    from csg_jax.dataset import DatasetRun, read_manifest

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_demo_manifest import make_demo_manifest

    devices = jax.device_count()
    report = {"mode": "dataset", "device": str(jax.devices()[0]), "backend": jax.default_backend(),
              "devices": devices, "processes": jax.process_count(), "host": platform.node(),
              "cpu_count": os.cpu_count(), "steps": args.steps, "dtype": args.dtype, "method": "csg", "results": {}}
    print(f"dataset mode: {devices} x {report['device']}  steps: {args.steps}  dtype: {args.dtype}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_dataset_")
    try:
        for model in args.models.split(","):
            pipe = build_pipeline(model, getattr(jnp, args.dtype))
            size = args.tiny_size if model == "tiny" else args.size
            n_max = max(sizes) * devices * args.dataset_batches
            manifest = make_demo_manifest(os.path.join(tmp, f"data_{model}_{size}"), n=n_max, size=size)
            all_items = read_manifest(manifest)
            config = EditConfig(num_steps=args.steps, dtype=args.dtype)
            print(f"\n{model}: {size}px\n{'batch/device':>12}{'images':>8}{'images/s':>10}{'steady':>10}{'compile+run s':>15}")
            rows = {}
            for b in sizes:
                items = all_items[: b * devices * args.dataset_batches]
                runs = []
                for k in range(2):
                    out = os.path.join(tmp, f"out_{model}_{b}_{k}")
                    runs.append(DatasetRun(pipe, items, config, out, batch_size=b, size=size, quiet=True).run())
                    shutil.rmtree(out, ignore_errors=True)
                warm = runs[1]
                if warm["failed"]:
                    raise RuntimeError(f"{warm['failed']} items failed in the benchmark run")
                rows[str(b)] = {"images": warm["ok"], "images_per_s": warm["images_per_s"],
                                "steady_images_per_s": warm["steady_images_per_s"], "wall_s": warm["wall_s"],
                                "compile_run_s": runs[0]["wall_s"], "global_batch": warm["global_batch"]}
                steady = warm["steady_images_per_s"]
                print(f"{b:>12}{warm['ok']:>8}{warm['images_per_s']:>10.3f}{(steady or float('nan')):>10.3f}"
                      f"{runs[0]['wall_s']:>15.1f}")
            report["results"][model] = {"size": size, "batch_sizes": rows}
            del pipe
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,sd15", help="comma list: tiny, sd15 (random SD-1.5-shaped), or model folders")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="image side for sd15 (tiny uses 32)")
    p.add_argument("--tiny-size", type=int, default=32)
    p.add_argument("--batch", default="1", help="images per call; a comma list (1,4,16) runs each")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--peak-gflops", type=float, default=190.0,
                   help="the machine's FLOP limit for %% of limit (default: 2 Zen-4 cores in float32, ~190 GFLOP/s)")
    p.add_argument("--save-edits", metavar="NPZ", help="also write every method's edited latents (to compare runs)")
    p.add_argument("--dataset", action="store_true",
                   help="dataset mode: images/s of `translate --manifest` runs (csg_jax/dataset.py) per --batch-sizes")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="dataset mode: images per device per step")
    p.add_argument("--dataset-batches", type=int, default=3, help="dataset mode: global batches per measurement")
    args = p.parse_args(argv)
    if args.dataset:
        return bench_dataset(args)

    dtype = getattr(jnp, args.dtype)
    batches = [int(b) for b in str(args.batch).split(",")]
    report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "host": platform.node(),
              "cpu_count": os.cpu_count(), "steps": args.steps, "dtype": args.dtype, "param_dtype": args.param_dtype,
              "batch": batches, "results": {}}
    print(f"device: {report['device']}  steps: {args.steps}  dtype: {args.dtype}  params: {args.param_dtype}  "
          f"batch: {args.batch}")
    for model in args.models.split(","):
        t0 = time.perf_counter()
        pipe = build_pipeline(model, dtype, getattr(jnp, args.param_dtype))
        size = args.tiny_size if model == "tiny" else args.size
        rng = np.random.RandomState(0)
        image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
        plan = plan_prompts(pipe, "a photo of a cat on the grass", task="cat2dog")
        gflop = unet_gflop(pipe, (size // pipe.downsample,) * 2, dtype)
        print(f"\n{model}: {size}px, built in {time.perf_counter() - t0:.1f}s; one UNet evaluation: {gflop:.1f} GFLOP "
              f"(XLA cost analysis); FLOP limit {args.peak_gflops:.0f} GFLOP/s")
        report["unet_gflop_per_eval"] = gflop
        print(f"{'method':<24}{'s/image':>10}{'compile s':>11}{'UNet evals':>12}{'s/eval':>10}{'% limit':>9}"
              f"{'XLA MB':>9}{'RSS GB':>8}")
        rows, edits = {}, {}
        report["results"][model] = {"size": size, **rows}
        for batch in batches:
            for name in args.methods.split(","):
                config = EditConfig(num_steps=args.steps, **METHODS[name])
                key = name if len(batches) == 1 else f"{name}@b{batch}"
                row, edit = bench_method(pipe, image, plan, config, args.repeats, batch)
                row["batch"] = batch
                row["pct_of_flop_limit"] = 100.0 * gflop / row["s_per_unet_eval"] / args.peak_gflops
                rows[key], edits[key] = row, edit
                peak = row.get("device_peak_bytes") or (row.get("compiled_temp_bytes", 0)
                                                        + row.get("compiled_argument_bytes", 0))
                print(f"{key:<24}{row['s_per_image']:>10.2f}{row['compile_s']:>11.1f}{row['unet_evals']:>12}"
                      f"{row['s_per_unet_eval']:>10.3f}{row['pct_of_flop_limit']:>8.0f}%{peak / 2**20:>9.0f}"
                      f"{row['peak_rss_gb_so_far']:>8.1f}", flush=True)
                report["results"][model] = {"size": size, **rows}
                _write_json(args.json, report)  # after every row: a run cut off keeps what it measured
        for key, row in rows.items():  # relative to ddim at the same batch, wherever it came in the order
            base = rows.get("ddim" if len(batches) == 1 else f"ddim@b{row['batch']}")
            if base:
                row["bookkeeping_overhead"] = row["s_per_unet_eval"] / base["s_per_unet_eval"] - 1.0
                print(f"{key}: s per UNet evaluation {row['bookkeeping_overhead']:+.1%} vs ddim (bookkeeping overhead)")
        if "csg" in rows and "pix2pix-zero" in rows:
            ratio = rows["pix2pix-zero"]["s_per_image"] / rows["csg"]["s_per_image"]
            evals = rows["pix2pix-zero"]["unet_evals"] / rows["csg"]["unet_evals"]
            rows["pix2pix_zero_vs_csg"] = {"time_ratio": ratio, "unet_eval_ratio": evals}
            print(f"pix2pix-zero / csg: {ratio:.2f}x the time per image ({evals:.2f}x the UNet evaluations)")
        if "csg" in edits and "csg-single-pass" in edits:
            d = np.abs(edits["csg"] - edits["csg-single-pass"])
            scale = float(np.abs(edits["csg"]).mean())
            rows["single_pass_vs_two_pass"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "mean_abs_latent": scale}
            print(f"single-pass vs two-pass edit latents: mean |diff| {d.mean():.4f} (max {d.max():.4f}; mean |latent| {scale:.3f})")
        report["results"][model] = {"size": size, **rows}
        if args.save_edits:
            io.atomic_write(args.save_edits, lambda f: np.savez(f, **{f"{model}/{k}": v for k, v in edits.items()}))
        del pipe
    _write_json(args.json, report)
    print(f"\nwrote {args.json}")


def _write_json(path: str, report: dict) -> None:
    io.atomic_write(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


if __name__ == "__main__":
    main()
