#!/usr/bin/env python3
"""Time the jit compile and the per-call cost of the UNet forward (random weights).

Cases:

* ``tiny``   -- the tiny SD-1 test UNet (``csg_jax.testing.tiny_configs("sd1")``), latents 16x16;
* ``sd15``   -- the SD-1.5-shaped UNet (``UNetConfig()`` defaults: 320/640/1280/1280 channels,
  8 heads, cross-attention dim 768), latents 32x32 (256 px) and 64x64 (512 px).

Batch 1, 77 context tokens. Compile time is ``jit(...).lower(...).compile()``; per-call time is
the median of ``--calls`` calls after one warm-up call, each ended with ``block_until_ready``.
A case is skipped when its estimated cost exceeds what is left of ``--budget-s``.

    python scripts/benchmark_unet.py                       # fp32, writes benchmark_unet.json
    python scripts/benchmark_unet.py --dtype bfloat16 --json bf16.json
    python scripts/benchmark_unet.py --cases tiny sd15@32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

CASES = {
    "tiny": ("tiny", 16),
    "sd15@32": ("sd15", 32),
    "sd15@64": ("sd15", 64),
}


def _unet_config(which: str):
    from csg_jax.models.unet import UNetConfig
    from csg_jax.testing import tiny_configs

    if which == "tiny":
        return UNetConfig.from_dict(tiny_configs("sd1")["unet"])
    return UNetConfig()


def _params(model, config, dtype):
    """Random params via a jitted init on a small input (params do not depend on the latent size).

    The key uses the ``unsafe_rbg`` PRNG: compiling the init with the default threefry PRNG takes
    ~3.5x longer on CPU, and the statistical quality of benchmark weights does not matter.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, 8, 8, config.in_channels), dtype)
    ctx = jnp.zeros((1, 77, config.cross_attention_dim), dtype)
    start = time.perf_counter()
    params = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), x, jnp.zeros((1,), jnp.int32), ctx)["params"]
    params = jax.block_until_ready(params)
    return params, time.perf_counter() - start


def run_case(name: str, dtype_name: str, calls: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from csg_jax.models.unet import UNet2DConditionModel

    which, hw = CASES[name]
    dtype = jnp.dtype(dtype_name)
    config = _unet_config(which)
    model = UNet2DConditionModel(config, dtype=dtype, param_dtype=dtype)
    params, init_s = _params(model, config, dtype)
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(batch, hw, hw, config.in_channels), dtype)
    t = jnp.full((batch,), 500, jnp.int32)
    ctx = jnp.asarray(rs.randn(batch, 77, config.cross_attention_dim), dtype)

    fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)[0])
    start = time.perf_counter()
    lowered = fn.lower(params, x, t, ctx)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    out = compiled(params, x, t, ctx).block_until_ready()
    warmup_s = time.perf_counter() - start
    assert np.isfinite(np.asarray(out, np.float32)).all(), f"{name}: non-finite output"
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        compiled(params, x, t, ctx).block_until_ready()
        times.append(time.perf_counter() - start)
    return {
        "case": name,
        "unet": which,
        "latent_hw": [hw, hw],
        "image_px": hw * 8,
        "batch": batch,
        "dtype": dtype_name,
        "params": n_params,
        "init_s": round(init_s, 3),
        "lower_s": round(lower_s, 3),
        "compile_s": round(compile_s, 3),
        "first_call_s": round(warmup_s, 4),
        "call_median_s": round(statistics.median(times), 4),
        "call_min_s": round(min(times), 4),
        "call_max_s": round(max(times), 4),
        "calls": len(times),
    }


def _estimate(name: str, done: dict, calls: int) -> float | None:
    """Rough seconds for ``sd15@64`` from ``sd15@32`` (4x the pixels; self-attention grows quadratically)."""
    if name == "sd15@64" and "sd15@32" in done:
        r = done["sd15@32"]
        return r["init_s"] + 1.5 * (r["lower_s"] + r["compile_s"]) + 6 * r["call_median_s"] * (calls + 1)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activation and parameter dtype (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per case, after one warm-up (>= 5)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES),
                        help="which cases to run (default: all)")
    parser.add_argument("--budget-s", type=float, default=1200.0,
                        help="skip a case whose estimated time exceeds what is left of this (default: %(default)s)")
    parser.add_argument("--json", default="benchmark_unet.json", help="where to write results (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.calls < 5:
        parser.error("--calls must be >= 5")

    import jax

    began = time.perf_counter()
    done: dict[str, dict] = {}
    skipped = {}
    for name in args.cases:
        left = args.budget_s - (time.perf_counter() - began)
        est = _estimate(name, done, args.calls)
        if est is not None and est > left:
            skipped[name] = f"estimated {est:.0f} s > {left:.0f} s left of --budget-s"
            print(f"skip {name}: {skipped[name]}", flush=True)
            continue
        print(f"running {name} ({args.dtype}) ...", flush=True)
        done[name] = run_case(name, args.dtype, args.calls, args.batch)

    head = f"{'case':9s} {'latents':>8s} {'px':>4s} {'dtype':>9s} {'params':>8s} {'init s':>7s} {'compile s':>10s} {'call ms (median)':>17s} {'min..max ms':>16s}"
    print()
    print(head)
    print("-" * len(head))
    for r in done.values():
        hw = "x".join(map(str, r["latent_hw"]))
        print(f"{r['case']:9s} {hw:>8s} {r['image_px']:>4d} {r['dtype']:>9s} {r['params'] / 1e6:7.1f}M {r['init_s']:7.1f} "
              f"{r['lower_s'] + r['compile_s']:10.1f} {1e3 * r['call_median_s']:17.1f} "
              f"{1e3 * r['call_min_s']:7.1f}..{1e3 * r['call_max_s']:<8.1f}")
    for name, why in skipped.items():
        print(f"{name:9s} skipped: {why}")

    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with open(args.json, "w") as f:
        json.dump({"env": env, "results": list(done.values()), "skipped": skipped}, f, indent=1)
    print(f"\nwrote {args.json}  (backend {env['backend']}, {env['cpu_count']} CPUs, load avg {env['loadavg_at_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
