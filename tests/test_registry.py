"""The method seam and the settings schema: a plug-in is one module plus a registry line; every
setting is declared once and coerced from files by its declaration."""

import subprocess

import jax
import numpy as np
import pytest

from csg_jax.dataset import item_config, read_manifest
from csg_jax.editing import costs, registry
from csg_jax.editing.config import EditConfig, fields_of_kind
from csg_jax.editing.editor import get_editor, plan_prompts, prepare_prompts
from csg_jax.errors import ConfigError


def test_a_toy_identity_method_is_one_module_and_one_registry_line(tiny_sd1, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "identity", registry.Entry("identity_method"))
    config = EditConfig(method="identity", num_steps=3)
    assert costs.unet_evaluations(config) == 3 * (1 + 1 + 0)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4))
    prompts = prepare_prompts(tiny_sd1, [plan_prompts(tiny_sd1, "a photo of a dog", task="dog2cat")], config)
    out = jax.tree.map(np.asarray, get_editor(tiny_sd1, config, (16, 16)).edit(x_T, prompts, config))
    np.testing.assert_array_equal(out["edited"], out["reconstruction"])
    ddim = EditConfig(method="ddim", num_steps=3)  # its reconstruction is the same source pass
    ref = get_editor(tiny_sd1, ddim, (16, 16)).edit(x_T, prepare_prompts(tiny_sd1, [plan_prompts(
        tiny_sd1, "a photo of a dog", task="dog2cat")], ddim), ddim)
    np.testing.assert_allclose(out["edited"], np.asarray(ref["reconstruction"]), atol=1e-5)


def test_no_module_outside_the_registry_compares_method_names():
    found = subprocess.run(["git", "grep", "-nE", r"method ?(==|!=|in) ?[\"'(]", "--", "csg_jax"],
                           capture_output=True, text=True).stdout
    assert found == "", found
    privates = subprocess.run(["git", "grep", "-nE", r"\._[a-z_]+_impl\b", "--", "csg_jax", "scripts", "tests"],
                              capture_output=True, text=True).stdout
    assert all(line.startswith("csg_jax/editing/editor.py") for line in privates.splitlines()), privates


def test_csv_overrides_reach_the_config_as_their_declared_types(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,image,prompt,task,method,cross_replace_steps,local_blend,steps,p2p.blend_start\n"
        "a,x.png,a cat,cat2dog,p2p,0.5,false,10,0\n"
        "b,x.png,a cat,cat2dog,p2p,0.5,true,10.0,0.25\n")
    a, b = (item_config(EditConfig(), it) for it in read_manifest(str(tmp_path / "m.csv")))
    assert (a.cross_replace_steps, a.local_blend, a.num_steps, a.method) == (0.5, False, 10, "p2p")
    assert type(a.cross_replace_steps) is float and type(a.num_steps) is int and a.local_blend is False
    assert (b.local_blend, b.num_steps, b.p2p.blend_start) == (True, 10, 0.25)
    for bad in ({"local_blend": "maybe"}, {"num_steps": "10.5"}, {"cross_replace_steps": "half"}):
        it = read_manifest(str(tmp_path / "m.csv"))[0]
        with pytest.raises(ConfigError, match=next(iter(bad))):
            item_config(EditConfig(), it.__class__(**{**it.__dict__, "overrides": tuple(bad.items())}))


def test_nested_and_flat_settings_are_one_schema(tmp_path):
    nested = EditConfig.from_dict({"method": "p2p", "p2p": {"local_blend": "yes", "cross_replace_steps": "0.6"},
                                   "csg": {"delta": 2}})
    flat = EditConfig(method="p2p", local_blend=True, cross_replace_steps=0.6, delta=2.0)
    assert nested == flat and nested.p2p.local_blend is True and flat.local_blend is True
    with pytest.raises(ConfigError, match="xa_guidance"):
        EditConfig.from_dict({"p2p": {"xa_guidance": 0.2}})  # names the option's own group
    # the static part drops traced and host settings only
    assert flat.static() == EditConfig(method="p2p", local_blend=True, guidance_scale=9.0, seed=4).static()
    assert flat.static() != EditConfig(method="p2p").static()
    assert set(fields_of_kind("batch")) >= {"cross_replace_steps", "xa_guidance"}
    assert fields_of_kind("image") == ("guidance_scale", "posterior_guidance", "delta")
    # method names imply their ablation settings; another method drops them
    ddim = EditConfig(method="ddim")
    assert (ddim.mixup, ddim.score_guidance) == ("none", False)
    assert ddim.replace(method="csg").mixup == "two-pass"
