"""PIE-Bench-format benchmark on the shipped shapes model: every method x {DDIM, Direct} inversion.

    python scripts/bench_pie_shapes.py --out out/pie_shapes
    python scripts/bench_pie_shapes.py --per-task 2 --steps 4 --methods ddim,csg --out /tmp/pie   # a smoke run

Writes held-out shapes scenes as PIE-Bench data (``OUT/data/mapping_file.json`` +
``annotation_images/``, ground-truth masks as the RLE), runs ``translate --manifest`` for each
(method, inversion) into ``OUT/runs/<method>+<inversion>/`` and scores them with ``evaluate
--pie-bench`` (``OUT/runs/../eval/``). Prints and writes the table (``OUT/pie_shapes.md``, ``.json``):
PIE-Bench's columns (PSNR / MSE / SSIM of the unedited part always; structure, LPIPS and CLIP with
``--dino`` / ``--squeeze`` + ``--lpips`` / ``--clip``) plus the shapes judge's target accuracy and
kept-attribute rate. Seconds include compilation (one program per row).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

METHODS = ("ddim", "csg-no-mixup", "csg", "p2p", "pix2pix-zero")


def main(argv=None) -> int:
    from csg_jax.errors import run_guarded

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/pie_shapes", help="output folder")
    p.add_argument("--model", default=None, help="diffusers-format shapes model folder (default: the shipped one)")
    p.add_argument("--per-task", type=int, default=10, help="held-out scenes per task")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the writer's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--inversions", default="ddim,direct", help="ddim (standard DDIM inversion) and/or direct")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=8, help="images per compiled call")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    w = p.add_argument_group("metric weights (PSNR / MSE / SSIM need none)")
    w.add_argument("--clip", help="transformers CLIPModel folder (ViT-L/14) -> CLIP whole / edited")
    w.add_argument("--dino", help="transformers ViTModel folder (dino-vitb8) -> structure distance")
    w.add_argument("--squeeze", help="torchvision squeezenet1_1 state dict (with --lpips) -> LPIPS")
    w.add_argument("--lpips", help="lpips v0.1 squeeze.pth heads (with --squeeze)")
    args = p.parse_args(argv)
    return run_guarded(lambda: run(args), "nothing written")


def run(args) -> int:
    from csg_jax import io
    from csg_jax.errors import ConfigError
    from csg_jax.pipeline import load_pipeline
    from csg_jax.shapes import pie, pie_run
    from csg_jax.shapes.judge import load_judge
    from csg_jax.shapes.model import shipped_model_dir

    methods = [m for m in args.methods.split(",") if m]
    inversions = [i for i in args.inversions.split(",") if i]
    bad = [i for i in inversions if i not in pie_run.INVERSIONS]
    if bad:
        raise ConfigError(f"--inversions: {', '.join(bad)} unknown; use {', '.join(pie_run.INVERSIONS)}")
    data = os.path.join(args.out, "data")
    kwargs = {} if args.tasks is None else {"tasks": [t for t in args.tasks.split(",") if t]}
    pie.write_pie_bench(data, per_task=args.per_task, seed=args.seed, **kwargs)
    judge = load_judge()
    pipe = load_pipeline(args.model or shipped_model_dir())
    weights = {"lpips_net": "squeeze"} if args.squeeze or args.lpips else {}
    weights.update({k: getattr(args, k) for k in ("clip", "dino", "squeeze", "lpips") if getattr(args, k)})
    t0 = time.perf_counter()
    result = pie_run.run_pie_benchmark(pipe, judge, data, args.out, methods, inversions, args.steps,
                                       args.batch_size, weights, log=lambda m: print(m, file=sys.stderr, flush=True))
    table = pie_run.format_table(result)
    header = (f"Shapes PIE-Bench: {args.per_task} scenes per task, {args.steps} steps, "
              f"{len(methods) * len(inversions)} runs in {time.perf_counter() - t0:.0f}s\n\n")
    io.atomic_write(os.path.join(args.out, "pie_shapes.md"), lambda f: f.write((header + table + "\n").encode()))
    io.save_json(os.path.join(args.out, "pie_shapes.json"),
                 {"settings": vars(args), "rows": result["rows"], "columns": result["columns"],
                  "skipped": result["pie"].get("skipped"), "items": result["pie"].get("items")})
    print(header + table)
    return 0 if not any(result["failed"].values()) else 3


if __name__ == "__main__":
    sys.exit(main())
