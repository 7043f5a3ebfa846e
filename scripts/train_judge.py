"""Train the shapes-world judge and write its weights (fp16 safetensors) and accuracy report.

    python scripts/train_judge.py                      # -> csg_jax/shapes/assets/judge.{safetensors,json}
    python scripts/train_judge.py --steps 300 --out /tmp/judge.safetensors   # quick check

Seeded: the same flags give the same weights on the same JAX version and backend.
Exits 1 if a held-out accuracy is below ``--min-accuracy``.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

from csg_jax.shapes.judge import WEIGHTS, save_judge
from csg_jax.shapes.judge_train import JudgeTrainConfig, train_judge


def main(argv=None) -> int:
    defaults = JudgeTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=WEIGHTS, help="weights file; the report goes next to it as .json")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--n-train", type=int, default=defaults.n_train)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--n-heldout", type=int, default=defaults.n_heldout)
    p.add_argument("--min-accuracy", type=float, default=0.98)
    args = p.parse_args(argv)

    cfg = JudgeTrainConfig(seed=args.seed, steps=args.steps, n_train=args.n_train, batch_size=args.batch_size,
                           n_heldout=args.n_heldout)
    judge, report = train_judge(cfg)
    save_judge(judge.params, args.out, report)
    print(json.dumps(report["heldout_accuracy"]), flush=True)
    worst = min(report["heldout_accuracy"].values())
    if worst < args.min_accuracy:
        print(f"held-out accuracy {worst:.4f} is below {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
