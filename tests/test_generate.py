"""``translate --generate``: edit a generated image (the official ``edit_synthetic_images.py``).

Expected values come from independent paths: x_T is a seeded Gaussian (drawn here with
``jax.random``), and the generated source of CSG's guided source pass must equal the source
branch of Prompt-to-Prompt's batched loop, a different implementation of the same CFG sampler.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from csg_jax.translate import main


def _gen(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["--generate", "a red circle on a blue background", "--seed", "7", "--task", "red2green",
               "--steps", "3", "--guidance-scale", "5", "--out", str(out), "--quiet", "--save-inversion", *extra])
    assert rc == 0
    return out


def test_generate_samples_from_the_seed_and_edits_from_the_same_x_T(tmp_path):
    a = _gen(tmp_path, "ddim", "--method", "ddim")
    b = _gen(tmp_path, "p2p", "--method", "p2p")
    x_T = np.load(a / "inversion.npy")
    want = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (1, *x_T.shape)))[0]
    np.testing.assert_array_equal(x_T, want)
    np.testing.assert_array_equal(np.load(b / "inversion.npy"), want)
    src_a = np.asarray(Image.open(a / "source.png"), np.int16)
    src_b = np.asarray(Image.open(b / "source.png"), np.int16)
    assert np.abs(src_a - src_b).max() <= 1  # same guided sampler, two implementations (uint8 rounding)
    assert np.array_equal(src_a, np.asarray(Image.open(a / "reconstruction.png"), np.int16))
    assert np.abs(np.asarray(Image.open(a / "edit.png"), np.int16) - src_a).mean() > 1  # the edit moved
    meta = json.loads((a / "meta.json").read_text())
    assert meta["image"]["generated"] == {"prompt": "a red circle on a blue background", "seed": 7}
    assert meta["settings"]["negative_prompt"] == "empty"  # the official script's negative prompt
    assert meta["settings"]["posterior_guidance"] == 0.1  # the official script's default
    # no inversion ran; the source was sampled with CFG (cond + empty prompt): 2 per step
    assert meta["unet_evaluations"]["per_step"] == {"inversion": 0, "source": 2, "target": 2}
    assert meta["unet_evaluations"]["total"] == 3 * (2 + 2)

    # dataset mode: a manifest item with "generate" and its seed gives the single-image CLI's edit
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "g7", "generate": True, "prompt": "a red circle on a blue background", "task": "red2green",
             "seed": 7},
            {"id": "both", "generate": True, "image": "x.png", "prompt": "a red circle", "task": "red2green"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "ds"
    rc = main(["--manifest", str(manifest), "--method", "ddim", "--steps", "3", "--guidance-scale", "5",
               "--out", str(out), "--quiet"])
    assert rc == 3  # one item failed
    results = {json.loads(l)["id"]: json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()}
    assert results["g7"]["status"] == "ok" and "not both" in results["both"]["error"]
    for name in ("source.png", "edit.png"):
        got = np.asarray(Image.open(out / "g7" / name), np.int16)
        assert np.abs(got - np.asarray(Image.open(a / name), np.int16)).max() <= 1, name
    assert json.loads((out / "g7" / "meta.json").read_text())["unet_evaluations"]["per_step"]["inversion"] == 0


def test_generate_refuses_an_inversion_and_an_image(tmp_path, capsys):
    rc = main(["--generate", "a red circle", "--task", "red2green", "--inversion", "direct",
               "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "no inversion" in capsys.readouterr().err
    rc = main(["--generate", "a red circle", "--task", "red2green", "--image", "a.png", "--out", str(tmp_path / "y")])
    assert rc == 2 and "replaces --image" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
