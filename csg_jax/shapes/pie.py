"""The shapes world as a PIE-Bench-format benchmark: ``mapping_file.json`` + ``annotation_images/``.

    python -m csg_jax.shapes.pie --out bench/shapes_pie --per-task 10 --tasks circle2square red2blue

Each task (:class:`csg_jax.shapes.bench.Task`: "circle2square", "red2blue", ...) takes the same
held-out scenes as the shapes benchmark (:func:`csg_jax.shapes.bench.task_sources`), so the two
benchmarks edit the same pictures. An entry is written by :func:`csg_jax.pie_bench.write_mapping`:

* shape task: ``editing_type_id`` "1" (change object), "a red [circle] on a blue background" ->
  "a red [square] on a blue background", instruction "make the circle a square";
* colour task: "6" (change attribute: color), "a [red] circle ..." -> "a [blue] circle ...";
* ``blended_word`` "circle square" / "red blue"; ``image_path`` "<id>.png"; id "<task>_<nnn>";
* ``mask``: the region to edit, RLE over the image's own grid (size x size, not PIE's 512 x 512;
  decode with ``pie_bench.decode_mask(rle, (size, size))``), see :func:`edit_mask`;
* ``shapes`` (an extra field PIE-Bench's readers ignore): what a judge needs, see :func:`shapes_field`.

Images default to 32 x 32, the shipped shapes model's native size; ``size`` renders the same
scenes at another resolution (the world is resolution-free).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from csg_jax import pie_bench
from csg_jax.errors import CSGError
from csg_jax.shapes import world
from csg_jax.shapes.bench import DEFAULT_TASKS, Task, task_sources

NATIVE_SIZE = 32  # the shipped shapes model's image size
EDIT_TYPE = {"shape": "1", "color": "6"}  # PIE-Bench: change object / change attribute (color)
EDGE_PX = 1  # margin for the target's anti-aliased edge (pixels under half covered are not in its mask)


def target_scene(scene: world.Scene, task: Task) -> world.Scene:
    """The scene the ideal edit shows: ``scene`` with the task's attribute set to its target (same
    place, size, angle, background and texture)."""
    return dataclasses.replace(scene, **{task.attribute: task.target})


def edit_mask(scene: world.Scene, task: Task, size: int) -> tuple[np.ndarray, int]:
    """(mask (size, size) bool, dilation in pixels): the region the edit may change.

    Colour edits keep the footprint: the source object's ground-truth mask as it is (0 pixels).
    Shape edits draw the target shape over the same centre, radius and angle, which pokes out of
    the source's footprint (a square's corners over a circle, a star's tips over a triangle): the
    mask is the source mask dilated by the fewest pixels k that contain the target shape's
    ground-truth mask, plus :data:`EDGE_PX` for its soft edge -- chosen per scene, so it stays
    as tight as the pair of shapes allows at any ``size``.
    """
    _, source = world.render(scene, size)
    if task.attribute == "color":
        return source, 0
    _, target = world.render(target_scene(scene, task), size)
    k = 0
    while (target & ~world.dilate(source, k)).any():
        k += 1
    return world.dilate(source, k + EDGE_PX), k + EDGE_PX


def shapes_field(task: Task, scene: world.Scene, size: int, seed: int, index: int, dilation: int) -> dict:
    """The entry's ``shapes`` field::

        {"task": "circle2square", "attribute": "shape" | "color", "source": "circle", "target": "square",
         "kept": "color" | "shape",           # the attribute the edit must not change
         "scene": {world.Scene fields},       # the source scene: re-render it with scene_of + world.render
         "target_scene": {world.Scene fields},  # the ideal edit
         "size": 32, "split": "heldout", "seed": 0, "index": 3,  # task_sources(task, n, seed) row
         "mask_dilation": 2}                  # pixels the mask grows the source mask (edit_mask)
    """
    return {"task": task.name, "attribute": task.attribute, "source": task.source, "target": task.target,
            "kept": task.kept_attribute, "scene": _scene_dict(scene),
            "target_scene": _scene_dict(target_scene(scene, task)), "size": size, "split": "heldout", "seed": seed, "index": index, "mask_dilation": dilation}


def _scene_dict(scene: world.Scene) -> dict:
    d = dataclasses.asdict(scene)
    d["gradient"] = list(d["gradient"])
    return d


def scene_of(d: dict) -> world.Scene:
    """A ``shapes`` field's ``scene`` (or ``target_scene``) dict -> :class:`world.Scene`."""
    return world.Scene(**{**d, "gradient": tuple(d["gradient"])})


def read_shapes_fields(mapping_path: str) -> dict:
    """{id: shapes field} of a mapping file this module wrote (entries without one are left out)."""
    with open(mapping_path, encoding="utf-8") as f:
        data = json.load(f)
    return {key: rec["shapes"] for key, rec in data.items() if isinstance(rec, dict) and "shapes" in rec}


def _instruction(task: Task, scene: world.Scene) -> str:
    if task.attribute == "shape":
        return f"make the {task.source} a {task.target}"
    return f"make the {task.source} {scene.shape} {task.target}"


def write_pie_bench(out_dir: str, tasks: Sequence[str] = DEFAULT_TASKS, per_task: int = 10,
                    size: int = NATIVE_SIZE, seed: int = 0) -> str:
    """Write ``out_dir/mapping_file.json`` and ``out_dir/annotation_images/<id>.png`` (uint8 RGB,
    size x size) for ``per_task`` held-out scenes of each task; returns the mapping file's path.
    ``out_dir`` is replaced as a whole, atomically (no partial benchmark on failure)."""
    from csg_jax import io

    if per_task < 1:
        raise CSGError(f"per_task must be at least 1, got {per_task}")
    if size < 8:
        raise CSGError(f"size must be at least 8 pixels, got {size}")
    parsed = [Task.parse(t) for t in tasks]
    if not parsed:
        raise CSGError("give at least one task, e.g. circle2square or red2blue")
    if len({t.name for t in parsed}) != len(parsed):
        raise CSGError(f"tasks repeat: {list(tasks)}")
    items, extra = [], {}
    with io.StagedDir(out_dir) as stage:
        for task in parsed:
            scenes = task_sources(task, per_task, seed)["scenes"]
            if len(scenes) < per_task:  # task_sources draws 2n + 8 candidates; colour tasks drop some
                raise CSGError(f"task {task.name}: only {len(scenes)} held-out scenes fit, asked for {per_task}")
            for index, scene in enumerate(scenes):
                item_id = f"{task.name}_{index:03d}"
                image, _ = world.render(scene, size)
                io.save_png(os.path.join(stage.path, "annotation_images", f"{item_id}.png"),
                            (image * 255 + 0.5).astype(np.uint8))
                mask, dilation = edit_mask(scene, task, size)
                source = world.caption(scene)
                items.append(pie_bench.PieItem(
                    item_id, f"{item_id}.png", source, world.caption(target_scene(scene, task)), task.source,
                    task.target, EDIT_TYPE[task.attribute], _instruction(task, scene), (task.source, task.target),
                    tuple(pie_bench.encode_mask(mask))))
                extra[item_id] = {"shapes": shapes_field(task, scene, size, seed, index, dilation)}
        pie_bench.write_mapping(os.path.join(stage.path, "mapping_file.json"), items, extra=extra)
        stage.commit()
    return os.path.join(os.path.abspath(out_dir), "mapping_file.json")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m csg_jax.shapes.pie",
        description="Write a PIE-Bench-format benchmark (mapping_file.json + annotation_images/) of held-out "
                    "shapes-world scenes; translate it with python -m csg_jax.translate --manifest "
                    "DIR/mapping_file.json.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="benchmark folder (replaced atomically)")
    p.add_argument("--per-task", type=int, default=10, help="scenes per task")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help="shape tasks (circle2square: PIE type 1) and colour tasks (red2blue: PIE type 6); "
                        f"shapes {', '.join(world.SHAPES)}; colours {', '.join(world.COLOR_NAMES)}")
    p.add_argument("--size", type=int, default=NATIVE_SIZE, help="image side in pixels (the shapes model's is 32)")
    p.add_argument("--seed", type=int, default=0, help="held-out scene stream (as the shapes benchmark's)")
    args = p.parse_args(argv)
    try:
        path = write_pie_bench(args.out, args.tasks, args.per_task, args.size, args.seed)
    except CSGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(args.tasks)} tasks x {args.per_task} images, {args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
