"""The shapes world's ground truth, the shipped judge, the shipped model and the editing benchmark.

No training here: the judge and the text-to-image model are the shipped ones
(``scripts/train_judge.py`` and ``scripts/train_shapes.py`` made them).
"""

import os

import numpy as np
import pytest

from csg_jax.errors import PromptError
from csg_jax.shapes import world
from csg_jax.shapes.bench import dilate
from csg_jax.shapes.model import checksum, recorded_checksum, ship_model, shipped_model_dir

# Area of each unit shape (radius 1), from its definition in world._inside.
UNIT_AREA = {"circle": np.pi, "square": 1.64**2, "triangle": 3 * np.sqrt(3) / 4, "cross": 2 * 0.64 * 2 - 0.64**2}


def _erode(masks, pixels):
    return ~dilate(~masks, pixels)


@pytest.fixture(scope="module")
def heldout():
    return world.make_batch(7, 200, split="heldout")


@pytest.fixture(scope="module")
def judge():
    from csg_jax.shapes.judge import load_judge

    return load_judge()


def _model_folder():
    folder = shipped_model_dir()
    assert os.path.isfile(os.path.join(folder, "model_index.json")), (
        f"the trained shapes model is not in {folder} (it ships with the package; "
        "csg_jax.shapes.model.ship_model puts a training export there)")
    return folder


# --- the world -------------------------------------------------------------------------------

def test_captions_name_the_scene(heldout):
    for cap, sc in zip(heldout["captions"], heldout["scenes"]):
        assert cap.split() == ["a", sc.color, sc.shape, "on", "a", sc.background, "background"]
        assert sc.color != sc.background
        assert world.parse_caption(cap) == {"shape": sc.shape, "color": sc.color, "background": sc.background}
    for bad in ("a red circle on a blue", "a red blob on a blue background", "a photo of a cat sitting on grass"):
        with pytest.raises(ValueError, match="not a shapes-world caption"):
            world.parse_caption(bad)


def test_mask_area_matches_the_shape(heldout):
    for mask, sc in zip(heldout["masks"], heldout["scenes"]):
        assert mask.sum() > 0
        if sc.shape in UNIT_AREA:
            expected = UNIT_AREA[sc.shape] * sc.radius**2 * mask.size
            assert abs(mask.sum() - expected) <= 0.1 * expected + 4


def test_colour_inside_the_mask_is_the_object_colour_and_outside_the_background(heldout):
    images = heldout["images"].astype(np.float32) / 255.0
    inside = _erode(heldout["masks"], 1)
    outside = ~dilate(heldout["masks"], 1)
    for im, i_m, o_m, sc in zip(images, inside, outside, heldout["scenes"]):
        np.testing.assert_allclose(im[i_m].mean(0), world.COLORS[sc.color], atol=0.01)
        # the background is its colour times a brightness ramp (mean ~1) and texture, clipped at 1
        np.testing.assert_allclose(im[o_m].mean(0), world.COLORS[sc.background], atol=0.06)


# --- the judge -------------------------------------------------------------------------------

def test_judge_is_at_least_98_percent_accurate_on_heldout_images(judge, heldout):
    from csg_jax.shapes.judge import accuracy

    acc = accuracy(judge, heldout)
    assert min(acc.values()) >= 0.98, acc


def test_judge_report_states_at_least_98_percent(judge):
    assert judge.report is not None and min(judge.report["heldout_accuracy"].values()) >= 0.98


def test_object_mask_from_true_colours_recovers_the_ground_truth(heldout):
    from csg_jax.shapes.judge import iou, object_mask

    ious = [iou(object_mask(im, sc.color, sc.background), m)
            for im, m, sc in zip(heldout["images"], heldout["masks"], heldout["scenes"])]
    assert np.mean(ious) >= 0.95 and np.min(ious) >= 0.85


# --- benchmark pieces ------------------------------------------------------------------------

def test_tasks_parse_and_their_sources_show_the_source_word():
    from csg_jax.shapes.bench import Task, task_sources

    task = Task.parse("red2blue")
    assert (task.attribute, task.source, task.target, task.kept_attribute) == ("color", "red", "blue", "shape")
    assert Task.parse("circle2square").attribute == "shape"
    for bad in ("red2square", "red2red", "circle", "dog2cat"):
        with pytest.raises(PromptError):
            Task.parse(bad)
    sources = task_sources(task, 20, seed=3)
    assert len(sources["captions"]) == 20 and sources["images"].shape == (20, 32, 32, 3)
    assert all(sc.color == "red" and sc.background != "blue" for sc in sources["scenes"])


def test_localisation_ratio_is_one_when_the_mask_covers_everything(tiny_sd1):
    from csg_jax.shapes.localisation import cross_layers, word_localisation

    batch = world.make_batch(0, 2, split="heldout")
    captions = batch["captions"]  # the tiny model's tokenizer knows every shapes-world word
    full = np.ones_like(batch["masks"])
    out = word_localisation(tiny_sd1, batch["images"], full, captions, np.array([3, 3]), t=500)
    assert set(out["per_layer"]) == {l.name for l in cross_layers(tiny_sd1, (16, 16))}
    np.testing.assert_allclose(out["per_image"], 1.0, rtol=1e-5)
    real = word_localisation(tiny_sd1, batch["images"], batch["masks"], captions, np.array([3, 3]), t=500)
    assert np.all(np.isfinite(real["per_image"])) and np.all(real["per_image"] > 0)


# --- the shipped model -----------------------------------------------------------------------

def test_ship_model_writes_a_checksum_that_detects_changed_weights(tiny_sd1_dir, tmp_path):
    dest = str(tmp_path / "assets" / "shapes_model")
    digest = ship_model(tiny_sd1_dir, dest=dest)
    assert recorded_checksum(dest) == digest == checksum(dest) == checksum(tiny_sd1_dir)
    weights = os.path.join(dest, "unet", "diffusion_pytorch_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1
    open(weights, "wb").write(bytes(data))
    assert checksum(dest) != digest


def test_shipped_model_loads_and_matches_its_checksum():
    folder = _model_folder()
    from csg_jax.pipeline import load_pipeline

    assert checksum(folder) == recorded_checksum(folder)
    pipe = load_pipeline(folder)
    assert pipe.kind == "pixel" and pipe.unet.config.sample_size == 32


# --- the editing benchmark -------------------------------------------------------------------

def test_bench_smoke_csg_keeps_the_background_better_than_ddim(judge):
    from csg_jax.pipeline import load_pipeline
    from csg_jax.shapes.bench import markdown_table, run_benchmark

    pipe = load_pipeline(_model_folder())
    # 20 steps: with fewer, DDIM inversion error (not the method) dominates the background error.
    result = run_benchmark(pipe, judge, ("red2blue",), n_per_task=3, methods=("ddim", "csg", "no-such-method"),
                           num_steps=20, batch_size=3, warmup=False, log=lambda s: None)
    rows = {r["method"]: r for r in result["rows"] if r["task"] == "red2blue"}
    assert set(rows) == {"ddim", "csg"} and set(result["skipped"]) == {"no-such-method"}
    for r in rows.values():
        assert r["n"] == 3 and all(np.isfinite(r[k]) for k in ("target", "bg_error", "iou", "kept", "seconds"))
    assert rows["csg"]["bg_error"] < rows["ddim"]["bg_error"], markdown_table(result["rows"])
