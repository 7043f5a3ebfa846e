"""Write a small dataset of shapes-world images and a manifest for ``python -m csg_jax.translate --manifest``.

    python scripts/make_demo_manifest.py out/demo_data --n 4
    python -m csg_jax.translate --manifest out/demo_data/manifest.jsonl --out out/demo_ds --batch-size 2

Each image is a red shape on a coloured background (``csg_jax.shapes.world.make_batch``), its
caption is the source prompt ("a red circle on a blue background") and the task recolours the
object: ``red2<colour>`` (the source word "red" is in every caption).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csg_jax.io import save_png  # noqa: E402
from csg_jax.shapes.world import make_batch  # noqa: E402

TARGETS = ("blue", "green", "yellow", "purple", "orange", "white", "black")


def make_demo_manifest(folder: str, n: int = 4, size: int = 32, seed: int = 0, source_color: str = "red") -> str:
    """Write ``folder/images/<id>.png`` and ``folder/manifest.jsonl``; returns the manifest's path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    batch = make_batch(seed, n, size=size, split="heldout", color=source_color)
    targets = [c for c in TARGETS if c != source_color]
    lines = []
    for i, (image, caption, scene) in enumerate(zip(batch["images"], batch["captions"], batch["scenes"])):
        item_id = f"{i:03d}-{scene.shape}"
        save_png(os.path.join(folder, "images", f"{item_id}.png"), image)
        target = next(c for c in targets[i % len(targets):] + targets if c != scene.background)
        lines.append({"id": item_id, "image": f"images/{item_id}.png", "prompt": caption,
                      "task": f"{source_color}2{target}", "seed": i})
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = make_demo_manifest(args.folder, args.n, args.size, args.seed)
    print(f"wrote {path} ({args.n} items)")


if __name__ == "__main__":
    main()
