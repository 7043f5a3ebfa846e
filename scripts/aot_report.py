"""Compile every csg_jax program for accelerators that are not here and report its memory per chip.

    pip install -e ".[aot-tpu,aot-cuda]"
    python scripts/aot_report.py --target h100 --target v5e --size 512 --steps 50 --dtype bfloat16 \\
        --max-batch --json aot.json

For each target and program (encode, invert, invert-official, null-text, invert-direct,
edit:<method> for every method, edit-direct:<method> after Direct Inversion for csg, p2p and
pix2pix-zero, decode, dataset:csg = the dataset mode's sharded batch over a 4-chip slice) it compiles
from abstract arguments (no weights are read), prints argument / temp / output GiB per chip,
whether the program fits the chip (total <= --usable x its memory), and with --max-batch the
largest batch per chip that fits (affine-guided bisection, a few compiles per program). A
program that does not fit or does not compile is listed with its largest temporary buffers from
XLA's buffer assignment. ``--target cpu`` compiles for this machine (for tests; give
--memory-gib). TPU compiles are slow on 2 cores (minutes per program at 512 px); ulimit -s
unlimited first (libtpu recurses deeply on large programs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csg_jax import aot, io  # noqa: E402  (import no JAX: the environment is set first)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", choices=sorted(aot.TARGETS),
                   help="chip to compile for (repeatable; default h100 and v5e)")
    p.add_argument("--programs", default=",".join(aot.PROGRAMS),
                   help=f"comma list (default all): {', '.join(aot.PROGRAMS)}")
    p.add_argument("--model", default="sd15", help="architecture: sd15, tiny, or a diffusers folder (configs only)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="activation dtype")
    p.add_argument("--param-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1, help="images per chip to compile at")
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch per chip that fits")
    p.add_argument("--batch-limit", type=int, default=256, help="--max-batch searches up to this")
    p.add_argument("--usable", type=float, default=0.9,
                   help="fraction of the chip's memory a program may use (the rest: runtime, workspaces)")
    p.add_argument("--memory-gib", type=float, default=None, help="override the chip's memory (required for cpu)")
    p.add_argument("--chips", type=int, default=4, help="chips of the dataset program's mesh")
    p.add_argument("--compare-steps", type=int, default=None, metavar="N",
                   help="also compile at N steps and check that the temp memory grows by no more than the stored "
                        "per-step latents (the edit's source trajectory)")
    p.add_argument("--no-dump", action="store_true", help="skip XLA's buffer-assignment dump (no largest buffers)")
    p.add_argument("--run", action="store_true",
                   help="--target device: also execute each program once (zeros) and report the allocator's peak")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as markdown")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="compile nothing: merge earlier --json reports (later rows win) into --markdown / stdout")
    args = p.parse_args(argv)
    if args.from_json:
        return args
    args.target = args.target or ["h100", "v5e"]
    for name in args.programs.split(","):
        if name not in aot.PROGRAMS:
            p.error(f"unknown program {name!r}; choose from {', '.join(aot.PROGRAMS)}")
    if args.run and args.target != ["device"]:
        p.error("--run needs --target device (the others are compiled for chips that are not here)")
    if "cpu" in args.target and args.memory_gib is None:
        p.error("--target cpu needs --memory-gib (the CPU backend has no fixed memory)")
    if not 0 < args.usable <= 1:
        p.error("--usable must lie in (0, 1]")
    if args.batch < 1 or args.batch_limit < args.batch:
        p.error("--batch must be >= 1 and <= --batch-limit")
    return args


def gib(n: int) -> str:
    return f"{n / aot.GIB:.2f}"


def run(args) -> dict:
    if "device" in args.target:
        from csg_jax import runtime

        runtime.add_xla_flags()  # what the csg_jax commands run with
    else:
        aot.deviceless_environment()
    import jax.numpy as jnp

    pipe = aot.abstract_pipeline(aot.model_configs(args.model), getattr(jnp, args.dtype), getattr(jnp, args.param_dtype))
    setting = aot.Setting(args.size, args.steps, args.dtype, args.param_dtype)
    report = {"model": args.model, "setting": vars(setting), "usable": args.usable, "host": platform.node(),
              "cpu_count": os.cpu_count(), "results": []}
    head = (f"{'program':<19}{'target':<7}{'batch':>6}{'args':>8}{'temp':>8}{'out':>8}{'total':>8}"
            f"{'fits':>6}{'max b':>7}{'GiB/img':>9}{'compile s':>11}")
    print(f"{args.model}: {args.size} px, {args.steps} steps, activations {args.dtype}, params {args.param_dtype}; "
          f"GiB per chip, fits = total <= {args.usable:.0%} of the chip")
    print(head)
    problems, growth = [], []
    for tname in args.target:
        target = aot.TARGETS[tname]
        chips = args.chips if any(p.startswith("dataset") for p in args.programs.split(",")) else 1
        try:
            devices = aot.target_devices(target, chips)
        except (aot.ToolchainMissing, ValueError) as e:
            print(f"{tname}: {e}")
            report["results"].append({"target": tname, "error": str(e)})
            continue
        memory = int(args.memory_gib * aot.GIB) if args.memory_gib else target.memory_bytes
        if tname == "device":
            report["device"] = str(devices[0])
            memory = memory or int((devices[0].memory_stats() or {}).get("bytes_limit", 0))
        for program in args.programs.split(","):
            t0 = time.perf_counter()
            res = aot.program_result(program, pipe, setting, args.batch, target, devices, dump=not args.no_dump,
                                     run=args.run)
            row = {"program": program, "target": tname, "memory_bytes": memory, **_row(res)}
            if args.run:
                row.update(device_peak_bytes=res.device_peak_bytes, run_s=res.run_s)
                if res.device_peak_bytes:
                    print(f"  {program}: device peak {gib(res.device_peak_bytes)} GiB vs compiled total "
                          f"{gib(res.total_bytes)} GiB (run {res.run_s:.2f} s)", flush=True)
            row["fits"] = aot.fits(res, memory, args.usable)
            max_b, per_image = None, None
            if args.max_batch and res.ok:
                measured = {}

                def need(b):
                    r = aot.program_result(program, pipe, setting, b, target, devices, dump=False)
                    measured[b] = _row(r)
                    return r.total_bytes if r.ok else None

                max_b, seen = aot.largest_batch(need, int(args.usable * memory), start=args.batch,
                                                limit=args.batch_limit, known={args.batch: res.total_bytes})
                row["max_batch"], row["batch_limit"] = max_b, args.batch_limit
                row["bisection"] = {str(b): v for b, v in sorted(seen.items())}
                pts = sorted((b, v) for b, v in seen.items() if v is not None)
                if len(pts) >= 2:
                    (b1, n1), (b2, n2) = pts[0], pts[-1]
                    per_image = (n2 - n1) / (b2 - b1)
                    row["bytes_per_image"] = per_image
            if args.compare_steps and res.ok:
                row.update(_steps_growth(program, pipe, setting, args, target, devices, res))
                growth.append(row)
            row["search_s"] = time.perf_counter() - t0
            report["results"].append(row)
            fit = "yes" if row["fits"] else ("ERR" if not res.ok else "no")
            print(f"{program:<19}{tname:<7}{args.batch:>6}{gib(res.argument_bytes):>8}{gib(res.temp_bytes):>8}"
                  f"{gib(res.output_bytes):>8}{gib(res.total_bytes):>8}{fit:>6}"
                  f"{'' if max_b is None else max_b:>7}{'' if per_image is None else gib(per_image):>9}"
                  f"{res.compile_s:>11.1f}", flush=True)
            if not row["fits"]:
                problems.append(res)
            _write_json(args.json, report)  # after every row: a run cut off keeps what it measured
    if growth:
        print(f"\ntemp memory, {args.compare_steps} -> {args.steps} steps (allowed: the stored per-step latents)")
        for row in growth:
            if row["temp_growth_bytes"] is None:
                print(f"  {row['program']:<19}{row['target']:<7} did not compile at {args.compare_steps} steps")
                continue
            ok = "ok" if row["temp_growth_bytes"] <= row["allowed_growth_bytes"] else "EXCEEDS"
            print(f"  {row['program']:<19}{row['target']:<7} {row['temp_growth_bytes'] / 2**20:+10.2f} MiB"
                  f"  allowed {row['allowed_growth_bytes'] / 2**20:8.2f} MiB  {ok}")
    for res in problems:
        why = res.error or f"needs {gib(res.total_bytes)} GiB"
        print(f"\n{res.program} on {res.target} at batch {res.batch}: {why}")
        for size, name, shape in res.largest_buffers:
            print(f"    {size / 2**20:>10.1f} MiB  {name}  {shape}")
    _write_json(args.json, report)
    if args.json:
        print(f"\nwrote {args.json}")
    return report


def _write_json(path: Optional[str], report: dict) -> None:
    if path:
        io.atomic_write(path, lambda f: f.write(json.dumps(report, indent=2).encode()))


def _steps_growth(program, pipe, setting, args, target, devices, res) -> dict:
    """Temp bytes at --compare-steps vs at --steps, and what the stored latents account for."""
    import dataclasses

    other = aot.program_result(program, pipe, dataclasses.replace(setting, steps=args.compare_steps), args.batch,
                               target, devices, dump=False)
    side = args.size // pipe.downsample
    latent = side * side * pipe.unet.config.in_channels * 4  # float32 latent per image
    keeps_trajectory = program.startswith(("edit:", "edit-direct:", "dataset:"))  # the source pass's x_t per step
    allowed = abs(args.steps - args.compare_steps) * args.batch * latent if keeps_trajectory else 0  # per chip
    return {"compare_steps": args.compare_steps, "compare_temp_bytes": other.temp_bytes if other.ok else None,
            "temp_growth_bytes": (res.temp_bytes - other.temp_bytes) if other.ok else None,
            "allowed_growth_bytes": allowed}


def _row(res) -> dict:
    return {"batch": res.batch, "ok": res.ok, "argument_bytes": res.argument_bytes, "output_bytes": res.output_bytes,
            "alias_bytes": res.alias_bytes, "temp_bytes": res.temp_bytes, "total_bytes": res.total_bytes,
            "compile_s": round(res.compile_s, 2), "error": res.error,
            "largest_buffers": [list(b) for b in res.largest_buffers]}


def markdown_table(rows: list[dict], limit: Optional[int] = None) -> str:
    """Rows of one or more reports as a markdown table (GiB per chip)."""
    out = ["| program | target | batch / chip | args | temp | out | total | fits | max batch / chip | GiB / image |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "program" not in r:
            continue
        if not r["ok"]:
            out.append(f"| {r['program']} | {r['target']} | {r['batch']} | | | | | does not compile | | |")
            continue
        best = r.get("max_batch")
        lim = r.get("batch_limit") or limit
        best = "" if best is None else (f">= {best}" if lim and best >= lim else str(best))
        per = r.get("bytes_per_image")
        out.append(f"| {r['program']} | {r['target']} | {r['batch']} | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | "
                   f"{gib(r['output_bytes'])} | {gib(r['total_bytes'])} | {'yes' if r['fits'] else '**no**'} | {best} | "
                   f"{'' if per is None else gib(per)} |")
    return "\n".join(out) + "\n"


def merge_reports(paths) -> list[dict]:
    rows = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                if "program" in r:
                    rows[(r["program"], r["target"])] = r
    order = {p: i for i, p in enumerate(aot.PROGRAMS)}
    return sorted(rows.values(), key=lambda r: (r["target"], order.get(r["program"], 99)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        table = markdown_table(merge_reports(args.from_json), args.batch_limit)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        print(table, end="")
        return 0
    report = run(args)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(report["results"], args.batch_limit))
    return 0 if all(r.get("ok", False) for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
