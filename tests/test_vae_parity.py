"""Parity of csg_jax.models.vae.AutoencoderKL with diffusers' AutoencoderKL (tiny, random weights)."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csg_jax.convert import flatten, state_dict_to_flax
from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.models.vae import AutoencoderKL, VAEConfig, fix_legacy_keys

torch.set_num_threads(1)

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """(torch vae, config dict, numpy state dict) of a tiny diffusers VAE saved as safetensors."""
    from diffusers import AutoencoderKL as TorchVAE
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    vae = TorchVAE(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
    vae.eval()
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    (path,) = glob.glob(os.path.join(folder, "*.safetensors"))
    sd = load_file(path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    return vae, cfg, sd


def _model_and_template(cfg_dict):
    config = VAEConfig.from_dict(cfg_dict)
    model = AutoencoderKL(config)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    return model, template


def test_encode_decode_parity(tiny_vae):
    vae, cfg, sd = tiny_vae
    model, template = _model_and_template(cfg)
    params = {"params": state_dict_to_flax(sd, template, source="tiny vae")}

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(2, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal(size=(2, 16, 16, 4)).astype(np.float32)

    with torch.no_grad():
        post = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        ref_mean = post.mean.numpy().transpose(0, 2, 3, 1)
        ref_logvar = post.logvar.numpy().transpose(0, 2, 3, 1)
        ref_img = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)

    mean, logvar = jax.jit(lambda p, a: model.apply(p, a, method=AutoencoderKL.encode))(params, x)
    img = jax.jit(lambda p, a: model.apply(p, a, method=AutoencoderKL.decode))(params, z)

    assert mean.shape == logvar.shape == (2, 16, 16, 4)
    assert img.shape == (2, 32, 32, 3)
    errs = {
        "mean": float(np.max(np.abs(np.asarray(mean) - ref_mean))),
        "logvar": float(np.max(np.abs(np.asarray(logvar) - ref_logvar))),
        "decode": float(np.max(np.abs(np.asarray(img) - ref_img))),
    }
    print("VAE max abs errors:", errs, "ref scales:", float(np.abs(ref_mean).max()), float(np.abs(ref_img).max()))
    for name, err in errs.items():
        assert err <= TOL, f"{name}: max abs err {err}"


def test_legacy_attention_keys(tiny_vae):
    _, cfg, sd = tiny_vae
    _, template = _model_and_template(cfg)
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    n_renamed = 0
    for key, arr in sd.items():
        for new, old in new_to_old.items():
            marker = f".{new}."
            if ".mid_block.attentions." in key and marker in key:
                key = key.replace(marker, f".{old}.")
                if arr.ndim == 2:
                    arr = arr[:, :, None, None]  # stored as a 1x1 conv
                n_renamed += 1
                break
        legacy[key] = arr
    assert n_renamed == 16  # encoder + decoder, 4 layers, weight + bias
    assert any(k.endswith("mid_block.attentions.0.query.weight") for k in legacy)

    with pytest.raises(Exception):
        state_dict_to_flax(legacy, template)  # old names do not convert as-is

    fixed = fix_legacy_keys(legacy)
    assert set(fixed) == set(sd)
    got = flatten(state_dict_to_flax(fixed, template))
    want = flatten(state_dict_to_flax(sd, template))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))

    # Keys outside the mid-block attention are left alone, even if they contain the old names.
    other = {"encoder.key.weight": 1, "decoder.mid_block.resnets.0.query.weight": 2}
    assert fix_legacy_keys(other) == other
    # Old and new name of one tensor in one file is an error.
    both = {
        "encoder.mid_block.attentions.0.to_q.weight": 1,
        "encoder.mid_block.attentions.0.query.weight": 2,
    }
    with pytest.raises(CheckpointError):
        fix_legacy_keys(both)


def test_config_errors(tiny_vae):
    _, cfg, _ = tiny_vae
    config = VAEConfig.from_dict(cfg)
    assert config.block_out_channels == (8, 16)
    assert config.scaling_factor == pytest.approx(0.18215)
    assert config.downsample_factor == 2

    bad = dict(cfg, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
    with pytest.raises(ConfigError, match="down_block_types"):
        VAEConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="up_block_types"):
        VAEConfig.from_dict(dict(cfg, up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]))
    with pytest.raises(ConfigError, match="act_fn"):
        VAEConfig.from_dict(dict(cfg, act_fn="gelu"))
    with pytest.raises(ConfigError, match="norm_num_groups"):
        VAEConfig.from_dict(dict(cfg, norm_num_groups=3))


def test_names_match_other_variants():
    """Key/shape tree walk for a variant: 3 blocks, 2 layers, no mid attention, no quant convs."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(1)
    vae = TorchVAE(
        block_out_channels=(8, 8, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    cfg = dict(vae.config)
    cfg["_class_name"] = "AutoencoderKL"
    config = VAEConfig.from_dict(cfg)
    assert config.downsample_factor == 4 and not config.use_quant_conv
    model = AutoencoderKL(config)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    state_dict_to_flax(sd, template)  # raises if any name or shape differs
    mean, logvar = jax.eval_shape(lambda p, a: model.apply({"params": p}, a, method=AutoencoderKL.encode), template, x)
    assert mean.shape == logvar.shape == (1, 4, 4, 3)
