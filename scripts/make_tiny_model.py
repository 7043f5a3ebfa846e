#!/usr/bin/env python3
"""Write a tiny random Stable-Diffusion-shaped model folder (diffusers format, safetensors).

    python scripts/make_tiny_model.py /tmp/tiny_sd1
    python scripts/make_tiny_model.py /tmp/tiny_sd2 --variant sd2 --seed 1

The folder loads with ``csg_jax.pipeline.load_pipeline`` and with diffusers /
transformers ``from_pretrained`` (see ``csg_jax.testing.make_tiny_model``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("out", help="folder to write (created; existing files are overwritten)")
    parser.add_argument("--variant", choices=("sd1", "sd2"), default="sd1",
                        help="sd1: conv projections, quick_gelu, epsilon; sd2: linear projections, "
                             "per-block heads, upcast attention, gelu, v-prediction (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: %(default)s)")
    args = parser.parse_args(argv)

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"{args.out} exists and is not a folder")

    from csg_jax.testing import make_tiny_model

    start = time.perf_counter()
    folder = make_tiny_model(args.out, args.variant, seed=args.seed)
    took = time.perf_counter() - start
    total = 0
    print(f"wrote tiny {args.variant} model (seed {args.seed}) to {os.path.abspath(folder)} in {took:.1f} s:")
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            total += size
            print(f"  {os.path.relpath(path, folder):45s} {size:>10,d} bytes")
    print(f"  {'total':45s} {total:>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
