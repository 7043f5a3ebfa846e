"""load_pipeline on good and bad model folders: one clear CheckpointError / ConfigError naming the
file or tensor; sharded safetensors, PyTorch .bin, the Orbax params cache, loading without torch.

Every mutation happens on a copy of the session's tiny SD-1 folder (``shutil.copytree``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from csg_jax.convert import flatten, flax_to_state_dict, state_dict_to_flax
from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.pipeline import load_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def copy(tiny_sd1_dir, tmp_path):
    """A private copy of the tiny SD-1 folder."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, dst)
    return str(dst)


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def _load_error(path, kind):
    """Load ``path`` expecting exactly one ``kind`` error; returns its message."""
    with pytest.raises(kind) as info:
        load_pipeline(path)
    err = info.value
    assert err.__cause__ is None  # raised "from None": the user sees one error, not a chain
    return str(err)


def _assert_trees_equal(a, b):
    fa, fb = flatten(jax.tree.map(np.asarray, a)), flatten(jax.tree.map(np.asarray, b))
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


# -- missing / malformed files -------------------------------------------------------------------
def test_missing_folder(tmp_path):
    path = str(tmp_path / "no_such_model")
    msg = _load_error(path, CheckpointError)
    assert path in msg


def test_missing_model_index(copy):
    os.remove(os.path.join(copy, "model_index.json"))
    msg = _load_error(copy, CheckpointError)
    assert "model_index.json" in msg and copy in msg


def test_missing_unet_config(copy):
    os.remove(os.path.join(copy, "unet", "config.json"))
    msg = _load_error(copy, CheckpointError)
    assert os.path.join("unet", "config.json") in msg


def test_malformed_unet_config(copy):
    with open(os.path.join(copy, "unet", "config.json"), "w") as f:
        f.write('{"in_channels": 4, "block_out_channels": [32, 32')
    msg = _load_error(copy, ConfigError)
    assert os.path.join("unet", "config.json") in msg and "JSON" in msg


# -- weights that do not fit -----------------------------------------------------------------------
def _rewrite_unet(folder, edit):
    path = os.path.join(folder, "unet", UNET_FILE)
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_tensor_with_wrong_shape(copy):
    _rewrite_unet(copy, lambda sd: sd.update({"conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)}))
    msg = _load_error(copy, CheckpointError)
    assert "conv_in.weight" in msg and "(16, 4, 3, 3)" in msg and os.path.join(copy, "unet") in msg


def test_extra_unknown_tensor(copy):
    _rewrite_unet(copy, lambda sd: sd.update({"down_blocks.0.foo.weight": np.zeros((3,), np.float32)}))
    msg = _load_error(copy, CheckpointError)
    assert "down_blocks.0.foo.weight" in msg and os.path.join(copy, "unet") in msg


def test_missing_tensor(copy):
    _rewrite_unet(copy, lambda sd: sd.pop("conv_out.bias"))
    msg = _load_error(copy, CheckpointError)
    assert "conv_out/bias" in msg and os.path.join(copy, "unet") in msg


# -- unsupported architectures ----------------------------------------------------------------------
def test_sdxl_like_unet_config(copy):
    _edit_json(os.path.join(copy, "unet", "config.json"), addition_embed_type="text_time",
               addition_time_embed_dim=256)
    msg = _load_error(copy, ConfigError)
    assert "addition_embed_type" in msg and "'text_time'" in msg
    assert os.path.join(copy, "unet", "config.json") in msg


def test_second_text_encoder(copy):
    _edit_json(os.path.join(copy, "model_index.json"), _class_name="StableDiffusionXLPipeline",
               text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    msg = _load_error(copy, ConfigError)
    assert "second text encoder" in msg and copy in msg


def test_hub_id_without_network_fails_quickly():
    start = time.perf_counter()
    msg = _load_error("nobody/nonexistent-model", CheckpointError)
    assert "nobody/nonexistent-model" in msg and "Hugging Face Hub" in msg
    assert time.perf_counter() - start < 30


# -- other weight formats -----------------------------------------------------------------------------
def test_sharded_safetensors(copy, tiny_sd1):
    unet_dir = os.path.join(copy, "unet")
    sd = load_file(os.path.join(unet_dir, UNET_FILE))
    os.remove(os.path.join(unet_dir, UNET_FILE))
    keys = sorted(sd)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": part
              for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]))}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, os.path.join(unet_dir, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(unet_dir, UNET_FILE + ".index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}, f)
    pipe = load_pipeline(copy)
    _assert_trees_equal(pipe.params["unet"], tiny_sd1.params["unet"])


def _write_bin_unet(folder):
    import torch

    unet_dir = os.path.join(folder, "unet")
    sd = load_file(os.path.join(unet_dir, UNET_FILE))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, os.path.join(unet_dir, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(unet_dir, UNET_FILE))


def test_bin_unet_loads_with_torch(copy, tiny_sd1):
    pytest.importorskip("torch")
    _write_bin_unet(copy)
    pipe = load_pipeline(copy)
    _assert_trees_equal(pipe.params["unet"], tiny_sd1.params["unet"])


@pytest.fixture(scope="module")
def without_torch(tiny_sd1_dir, tmp_path_factory):
    """One subprocess with torch blocked: loads the tiny folder, then tries a .bin copy of it."""
    pytest.importorskip("torch")  # to write the .bin
    bin_dir = str(tmp_path_factory.mktemp("bin") / "model")
    shutil.copytree(tiny_sd1_dir, bin_dir)
    _write_bin_unet(bin_dir)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # "import torch" now raises ImportError
        import csg_jax.pipeline
        from csg_jax.errors import CheckpointError
        pipe = csg_jax.pipeline.load_pipeline({tiny_sd1_dir!r})
        print("LOADED", pipe.kind, sorted(pipe.params), flush=True)
        try:
            csg_jax.pipeline.load_pipeline({bin_dir!r})
            print("BIN LOADED")
        except CheckpointError as e:
            print("BIN ERROR", " ".join(str(e).split()))
        print("TORCH", sys.modules.get("torch"))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, bin_dir


def test_loading_needs_no_torch(without_torch):
    out, _ = without_torch
    assert "LOADED latent ['text_encoder', 'unet', 'vae']" in out
    assert "TORCH None" in out


def test_bin_without_torch_is_a_checkpoint_error(without_torch):
    out, bin_dir = without_torch
    line = next(l for l in out.splitlines() if l.startswith("BIN"))
    assert line.startswith("BIN ERROR"), line
    assert "torch" in line and os.path.join(bin_dir, "unet", "diffusion_pytorch_model.bin") in line


# -- Orbax cache and conversion round trip -----------------------------------------------------------
def test_params_cache(tiny_sd1_dir, tiny_sd1, tmp_path):
    cache = str(tmp_path / "cache")
    first = load_pipeline(tiny_sd1_dir, cache=cache)
    assert os.path.isfile(os.path.join(cache, "meta.json"))
    assert os.path.isdir(os.path.join(cache, "params"))
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    assert meta["source"] == os.path.abspath(tiny_sd1_dir) and meta["fingerprint"]
    second = load_pipeline(tiny_sd1_dir, cache=cache)
    _assert_trees_equal(first.params, tiny_sd1.params)
    _assert_trees_equal(second.params, first.params)
    for leaf in jax.tree.leaves(second.params):
        assert leaf.dtype == np.float32


def test_convert_round_trip(tiny_sd1_dir, tiny_sd1):
    params = tiny_sd1.params["unet"]
    sd = flax_to_state_dict(params)
    on_disk = load_file(os.path.join(tiny_sd1_dir, "unet", UNET_FILE))
    assert set(sd) == set(on_disk)
    for k in sd:
        np.testing.assert_array_equal(sd[k], on_disk[k], err_msg=k)
    back = state_dict_to_flax(sd, jax.eval_shape(lambda: params))
    _assert_trees_equal(back, params)


def test_lazy_safetensors_read_tensor_by_tensor_and_truncation_is_reported(tmp_path):
    """read_state_dict(lazy=True) gives handles that read each tensor when asked (float16 as
    float32, like the eager reader); a file cut short fails with a message naming it."""
    from csg_jax.weights import LazyTensor, read_state_dict

    rs = np.random.RandomState(0)
    tensors = {"a.weight": rs.randn(3, 4).astype(np.float32), "b.bias": rs.randn(5).astype(np.float16),
               "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    comp = tmp_path / "unet"
    comp.mkdir()
    path = comp / "diffusion_pytorch_model.safetensors"
    save_file(tensors, str(path))
    lazy = read_state_dict(str(comp), "unet", lazy=True)
    eager = read_state_dict(str(comp), "unet")
    assert set(lazy) == set(tensors) and all(isinstance(v, LazyTensor) for v in lazy.values())
    for k, v in tensors.items():
        got = np.asarray(lazy[k])
        assert got.dtype == eager[k].dtype and lazy[k].shape == v.shape
        np.testing.assert_array_equal(got, eager[k])
        np.testing.assert_array_equal(got, v.astype(np.float32) if v.dtype == np.float16 else v)
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # the last tensor's bytes are missing
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(str(comp), "unet", lazy=True)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=str(path.name)):
        read_state_dict(str(comp), "unet", lazy=True)
