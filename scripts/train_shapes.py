"""Train the shapes-world text-to-image model (pixel space, SD-shaped); see csg_jax/shapes/train.py.

    PYTHONPATH=. python3 scripts/train_shapes.py --smoke --out /tmp/shp_ckpt --export /tmp/shp_model
    PYTHONPATH=. python3 scripts/train_shapes.py --out /tmp/ckpt --export /tmp/export/shapes_model \\
        --batch-size 256 --steps 30000 --time-budget-s 400 --pool-size 100000 --export-every 120

Running it again with the same --out resumes from the latest checkpoint.

Only light imports at module level: the scene pool is rendered in spawned worker processes,
which import this file again.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the time budget counts from here (imports and compile included)

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install


def parse_args(argv=None) -> argparse.Namespace:
    from csg_jax.shapes.train_config import DEFAULT_RECIPE, RECIPES  # numpy only: --help stays fast

    p = argparse.ArgumentParser(description=__doc__.split("\n\nOnly")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory: Orbax checkpoints and train_log.jsonl")
    p.add_argument("--export", default=None, help="diffusers-format model folder (EMA weights), written at "
                   "the end and every --export-every seconds")
    p.add_argument("--export-tar", default=None, help="also write a tar of the export folder after every export")
    p.add_argument("--export-every", type=float, default=0.0, help="seconds between exports (default 0: only at the end)")
    p.add_argument("--log", default=None, help="JSON-lines log (default: OUT/train_log.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="steps to train, and the LR schedule's horizon "
                   "(default 30000; smoke 12)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop cleanly (checkpoint + export) before "
                   "this many seconds since start; the LR horizon is fitted to the steps that fit")
    p.add_argument("--no-fit-schedule", action="store_true", help="with a time budget, keep the LR horizon at --steps")
    p.add_argument("--batch-size", type=int, default=None, help="(default 32; smoke 4; pass 256 on a GPU)")
    p.add_argument("--pool-size", type=int, default=None, help="scenes rendered once and sampled from "
                   "(default 100000; smoke 512)")
    p.add_argument("--workers", type=int, default=None, help="pool rendering processes (default: cores - 1)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="(default 500; smoke 5)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights that gets exported "
                   "(default 0.999; ~0.995 for runs of ~1,000 steps)")
    p.add_argument("--t-focus", type=float, default=0.0, help="share of timesteps drawn from "
                   "[--t-focus-min, --t-focus-max) (default 0: uniform; with the cosine recipe 0.5 on [500, 900) "
                   "trains where the shape word matters most, see sample_timesteps)")
    p.add_argument("--t-focus-min", type=int, default=0, help="(default 0)")
    p.add_argument("--t-focus-max", type=int, default=400, help="(default 400)")
    p.add_argument("--edge-weight", type=float, default=0.0, help="extra loss weight of the pixels near the "
                   "object's outline: 1 + this there, 1 elsewhere (default 0: plain MSE; 4 makes the shape "
                   "word matter more, see csg_jax.shapes.train_data.edge_bands)")
    p.add_argument("--edge-width", type=int, default=2, help="half-thickness in pixels of that band (default 2)")
    p.add_argument("--loc-weight", type=float, default=0.0, help="weight of the word-localisation term that pulls "
                   "the cross-attention of the object's colour and shape words into its mask (default 0: off; "
                   "see csg_jax.shapes.train_step.localisation_loss)")
    p.add_argument("--loc-t-max", type=int, default=900, help="only images noised to t below this count for that "
                   "term (default 900)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                   help="noise schedule and image scale: pixel_cosine (default: cosine betas on [-1, 1] "
                        "images) or sd_latent (SD's betas, images x 0.18215; how runs before Nov 2026 trained)")
    p.add_argument("--init-from", default=None, help="start a new run from the weights of this diffusers model "
                   "folder (an earlier export), with a fresh optimizer; ignored when --out has a checkpoint")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activation dtype (default float32)")
    p.add_argument("--remat", choices=("auto", "off", "attention", "full"), default="auto",
                   help="recompute (parts of) the forward pass in the backward pass to save memory; auto: "
                   "the least that fits the device (falls back further on out-of-memory; default)")
    p.add_argument("--compile-cache", default=None, help="JAX persistent compilation cache dir "
                   "(default: none; smoke: OUT/jax_cache)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default 1000; smoke 6)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines (default 50; smoke 3)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--smoke", action="store_true", help="tiny run for testing the plumbing (same model): batch 4, 12 steps, pool 512")
    args = p.parse_args(argv)
    if not 0.0 <= args.t_focus <= 1.0:
        p.error(f"--t-focus is a share of the timesteps, in [0, 1]; got {args.t_focus}")
    if args.t_focus > 0 and not 0 <= args.t_focus_min < args.t_focus_max <= 1000:
        p.error(f"--t-focus-min {args.t_focus_min} / --t-focus-max {args.t_focus_max}: need 0 <= min < max <= 1000 "
                "(the window [min, max) of the 1,000 training timesteps)")
    if args.loc_weight < 0:
        p.error(f"--loc-weight must be >= 0; got {args.loc_weight}")
    if args.loc_weight > 0 and not 0 < args.loc_t_max <= 1000:
        p.error(f"--loc-t-max {args.loc_t_max}: need 0 < max <= 1000 (of the 1,000 training timesteps)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from csg_jax.shapes.train import RunOptions, train
    from csg_jax.shapes.train_config import RECIPES, TrainConfig

    smoke = args.smoke
    pick = lambda value, normal, tiny: value if value is not None else (tiny if smoke else normal)
    cfg = TrainConfig(
        batch_size=pick(args.batch_size, 32, 4),
        steps=pick(args.steps, 30000, 12),
        pool_size=pick(args.pool_size, 100_000, 512),
        seed=args.seed,
        lr=args.lr,
        warmup_steps=pick(args.warmup_steps, 500, 5),
        ema_decay=args.ema_decay,
        t_focus=args.t_focus,
        t_focus_max=args.t_focus_max,
        t_focus_min=args.t_focus_min,
        edge_weight=args.edge_weight,
        edge_width=args.edge_width,
        loc_weight=args.loc_weight,
        loc_t_max=args.loc_t_max,
        dtype=args.dtype,
        remat=args.remat,
        beta_schedule=RECIPES[args.recipe][0],
        scaling_factor=RECIPES[args.recipe][1],
    )
    opts = RunOptions(
        out=args.out,
        export=args.export,
        export_tar=args.export_tar,
        log=args.log,
        time_budget_s=args.time_budget_s,
        fit_schedule=not args.no_fit_schedule,
        calibrate_steps=3 if smoke else 100,
        export_every_s=args.export_every,
        ckpt_every=pick(args.ckpt_every, 1000, 6),
        log_every=pick(args.log_every, 50, 3),
        workers=args.workers,
        progress=not args.no_progress,
        reserve_s=5.0 if smoke else 20.0,
        init_from=args.init_from,
        compile_cache=args.compile_cache or (os.path.join(args.out, "jax_cache") if smoke else None),
    )
    print(f"[config] {json.dumps(cfg.__dict__)}", flush=True)
    from csg_jax.errors import run_guarded

    summary = run_guarded(lambda: train(cfg, opts, t_start=T_START),
                          on_interrupt="the last checkpoint is kept; the same command resumes from it")
    if isinstance(summary, int):
        return summary
    print("[done] " + json.dumps(summary), flush=True)
    print(f"SUMMARY steps={summary['steps']} (this run {summary['steps_this_run']}, stop: {summary['stop']}) "
          f"samples/s={summary['samples_per_s']} steps/s={summary['steps_per_s']} compile_s={summary['compile_s']} "
          f"pool_s={summary['pool_s']} wall_s={summary['wall_s']}", flush=True)
    if summary["stop"].startswith("signal"):
        return 130  # stopped on request, cleanly: checkpoint and export are written
    return 0 if summary["stop"] != "non-finite loss" else 1


if __name__ == "__main__":
    sys.exit(main())
