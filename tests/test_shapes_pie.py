"""The shapes world's PIE-Bench-format benchmark (csg_jax/shapes/pie.py): entries, images, masks.

No model: the files are read back through the format reader and the dataset reader and checked
against the world's own ground truth.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from csg_jax import pie_bench
from csg_jax.dataset import read_manifest
from csg_jax.errors import CSGError
from csg_jax.shapes import pie, world
from csg_jax.shapes.bench import Task, task_sources


@pytest.mark.parametrize("size", [32, 48])
def test_written_benchmark_reads_back_with_ground_truth_masks(tmp_path, size):
    tasks = ["circle2square", "triangle2star", "red2blue"]
    path = pie.write_pie_bench(str(tmp_path / "b"), tasks=tasks, per_task=3, size=size, seed=1)
    assert path == str(tmp_path / "b" / "mapping_file.json")
    items, bad = pie_bench.read_mapping(path)
    assert bad == [] and [it.id for it in items] == [f"{t}_{i:03d}" for t in tasks for i in range(3)]
    fields = pie.read_shapes_fields(path)
    grew = []
    for it in items:
        f = fields[it.id]
        task = Task.parse(f["task"])
        scene = pie.scene_of(f["scene"])
        assert scene == task_sources(task, 3, seed=1)["scenes"][f["index"]]  # the shapes benchmark's held-out scenes
        assert it.editing_type_id == {"shape": "1", "color": "6"}[task.attribute]
        assert (it.source_words, it.target_words) == (task.source, task.target)
        assert it.blended_word == (task.source, task.target)
        assert it.source_prompt == world.caption(scene) and it.target_prompt == world.caption(pie.scene_of(f["target_scene"]))
        image, source = world.render(scene, size)
        png = np.asarray(Image.open(os.path.join(tmp_path, "b", "annotation_images", it.image_path)))
        assert png.shape == (size, size, 3) and np.array_equal(png, (image * 255 + 0.5).astype(np.uint8))
        mask = pie_bench.decode_mask(it.mask, (size, size), border=False)
        if task.attribute == "color":
            assert np.array_equal(mask, source) and f["mask_dilation"] == 0
            continue
        _, target = world.render(pie.target_scene(scene, task), size)
        k = f["mask_dilation"]
        assert np.array_equal(mask, world.dilate(source, k)) and not (target & ~mask).any()
        if k > pie.EDGE_PX:  # the fewest pixels that contain the target shape
            assert (target & ~world.dilate(source, k - pie.EDGE_PX - 1)).any()
        grew.append(k)
    assert max(grew) > pie.EDGE_PX  # some target shape pokes out of its source (a star's tips over a triangle)

    # the dataset reader: one item per entry, images in annotation_images/, PIE's labels kept
    ds = read_manifest(path)
    assert [d.id for d in ds] == [it.id for it in items] and all(d.error is None for d in ds)
    first = ds[0]
    assert first.image == os.path.join(str(tmp_path / "b"), "annotation_images", "circle2square_000.png")
    assert (first.source_word, first.target_words) == ("circle", "square")
    assert dict(first.extra)["editing_type_id"] == "1" and dict(ds[-1].extra)["editing_type_id"] == "6"
    assert dict(first.extra)["editing_instruction"] == "make the circle a square"


def test_cli_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pie.main(["--help"])
    assert e.value.code == 0 and "--per-task" in capsys.readouterr().out
    assert pie.main(["--out", str(tmp_path / "c"), "--per-task", "1", "--tasks", "red2blue"]) == 0
    assert json.load(open(tmp_path / "c" / "mapping_file.json"))["red2blue_000"]["shapes"]["size"] == pie.NATIVE_SIZE
    assert pie.main(["--out", str(tmp_path / "d"), "--tasks", "circle2dog"]) == 2
    assert "both words must be shapes" in capsys.readouterr().err and not (tmp_path / "d").exists()
    with pytest.raises(CSGError, match="per_task"):
        pie.write_pie_bench(str(tmp_path / "e"), per_task=0)
    item = pie_bench.PieItem("x", "x.png", "a cat", "a dog", "cat", "dog", "1")
    with pytest.raises(CSGError, match="replace PIE-Bench's own fields"):
        pie_bench.write_mapping(str(tmp_path / "m.json"), [item], extra={"x": {"mask": [0, 1]}})
