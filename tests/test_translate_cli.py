"""The translate CLI and image reading: bad input ends in one message and exit code 2, no partial output."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from csg_jax import io
from csg_jax.errors import ImageError
from csg_jax.shapes.model import shipped_model_dir
from csg_jax.model_zoo import resolve_model
from csg_jax.translate import main


@pytest.fixture(autouse=True, scope="module")
def _embedded_model_home(tmp_path_factory):
    """Keep the embedded model the CLI makes on first use inside the test's temp folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CSG_JAX_HOME", str(tmp_path_factory.mktemp("csg_jax_home")))
    yield
    mp.undo()


def test_unreadable_image_is_a_clear_error_without_output(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    out = tmp_path / "out"
    rc = main(["--image", str(bad), "--prompt", "a photo of a cat", "--task", "cat2dog", "--out", str(out), "--quiet"])
    assert rc == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no staged leftovers


def test_missing_task_and_prompt_are_reported(tmp_path, capsys):
    rc = main(["--image", "x.png", "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc == 2 and "--prompt is required" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "P"])
def test_odd_image_modes_become_rgb_of_the_requested_size(tmp_path, mode):
    rs = np.random.RandomState(0)
    if mode == "I;16":
        img = Image.fromarray((rs.rand(50, 70) * 65535).astype(np.uint16))
    elif mode in ("RGBA", "LA"):
        img = Image.fromarray((rs.rand(50, 70, 4) * 255).astype(np.uint8), "RGBA").convert(mode)
    else:
        img = Image.fromarray((rs.rand(50, 70, 3) * 255).astype(np.uint8), "RGB").convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    arr, notices = io.load_image(str(path), 32, 8)
    assert arr.dtype == np.uint8 and arr.shape == (32, 40, 3)
    assert notices  # every conversion is reported
    if mode == "I;16":
        assert arr.max() > 200  # rescaled from 16 bits, not clipped to white/black
        assert arr.min() < 50


def test_translate_writes_every_output_atomically(tmp_path):
    out = tmp_path / "edit"
    rc = main(["--demo", "--steps", "3", "--out", str(out), "--quiet", "--save-inversion"])
    assert rc == 0
    names = {"edit.png", "reconstruction.png", "mask.png", "mask_raw.png", "grid.png", "meta.json", "inversion.npy"}
    assert names <= set(os.listdir(out))
    for n in names - {"meta.json", "inversion.npy"}:
        Image.open(out / n).verify()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["source"] == shipped_model_dir() and meta["model"]["kind"] == "pixel"  # the default
    assert meta["prompts"]["target_prompt"] == "a red square on a blue background"
    assert meta["prompts"]["source_span"] == [3, 4]
    assert meta["unet_evaluations"]["per_step"]["target"] == 4  # two-pass mixup, source maps stored
    # the saved inversion edits again without an image (invert once, edit many)
    rc = main(["--inversion", str(out / "inversion.npy"), "--prompt", "a red circle on a blue background",
               "--task", "red2green", "--steps", "3", "--out", str(tmp_path / "again"), "--quiet"])
    assert rc == 0 and (tmp_path / "again" / "edit.png").exists()


def test_model_names_resolve_and_a_missing_shipped_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    assert resolve_model("shapes") == shipped_model_dir()
    assert resolve_model("/some/folder") == "/some/folder"
    tiny = resolve_model("tiny")
    assert tiny.startswith(os.environ["CSG_JAX_HOME"]) and resolve_model("embedded") == tiny
    monkeypatch.setattr("csg_jax.shapes.model.ASSETS", str(tmp_path / "no-assets"))
    out = tmp_path / "out"
    assert main(["--demo", "--out", str(out), "--quiet"]) == 2
    assert "--model tiny" in capsys.readouterr().err and not out.exists()


def test_load_image_rejects_missing_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        io.load_image(str(tmp_path / "nope.png"), 32, 8)


def test_mask_overlay_keeps_the_foreground_and_dims_the_background():
    image = np.full((2, 2, 3), 0.5, np.float32)
    mask = np.array([[255, 0], [128, 255]], np.uint8)
    out = io.overlay(image, mask)
    np.testing.assert_allclose(out[0, 0], image[0, 0])  # foreground as it is, whatever its colour
    np.testing.assert_allclose(out[0, 1], 0.2 * image[0, 1])  # background dimmed, not tinted
    assert np.all(out[1, 0] == out[1, 0, 0]) and 0.1 < out[1, 0, 0] < 0.5  # grey stays grey
