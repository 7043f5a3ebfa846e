"""Tiny Stable-Diffusion-shaped models in the exact diffusers on-disk format, made without torch.

``make_tiny_model(folder, variant="sd1")`` writes ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` with randomly initialised weights
(PyTorch layout, safetensors). Tests load the same folder into our Flax modules and into the
PyTorch diffusers/transformers classes. Query/key weights are scaled up so that attention maps
are far from uniform and carry signal (x2: sharper makes fp32 itself ill-conditioned:
torch fp32 vs fp64 then differ by 4e-4).

Variants: ``"sd1"`` (conv projections, one head count, quick_gelu text encoder, epsilon) and
``"sd2"`` (linear projections, per-block head counts, upcast attention, gelu, v-prediction).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.convert import flatten, flax_to_state_dict, unflatten
from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from csg_jax.models.unet import UNet2DConditionModel, UNetConfig
from csg_jax.models.vae import AutoencoderKL, VAEConfig
from csg_jax.tokenizer_files import DEFAULT_WORDS, write_clip_tokenizer

SD1_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def tiny_configs(variant: str = "sd1", vocab_size: int = 1000) -> dict:
    """config.json contents of each component (diffusers / transformers field names)."""
    sd2 = variant == "sd2"
    if variant not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny variant {variant!r}; use 'sd1' or 'sd2'")
    cross = 32
    unet = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4, 4] if sd2 else 4,
        "cross_attention_dim": cross,
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "sample_size": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "act_fn": "silu",
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": cross,
        "intermediate_size": 64,
        "num_hidden_layers": 3 if sd2 else 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": cross,
    }
    scheduler = dict(SD1_SCHEDULER, prediction_type="v_prediction" if sd2 else "epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def _sharpen_and_perturb(params: dict, rng: np.random.RandomState, qk_scale: float, noise: float) -> dict:
    """Scale attention query/key kernels (non-uniform maps) and give norms/biases non-trivial values."""
    flat = flatten(jax.tree.map(np.asarray, params))
    out = {}
    for path, v in flat.items():
        v = np.array(v, dtype=np.float32)
        if path[-1] == "kernel" and path[-2] in ("to_q", "to_k", "q_proj", "k_proj"):
            v = v * qk_scale
        elif path[-1] in ("bias", "scale"):
            v = v + noise * rng.standard_normal(v.shape).astype(np.float32)
        out[path] = v
    return unflatten(out)


def init_params(configs: dict, seed: int = 0, qk_scale: float = 2.0, noise: float = 0.05) -> dict:
    """Random Flax params for each component of :func:`tiny_configs` (or any such configs)."""
    key = jax.random.PRNGKey(seed)
    k_unet, k_vae, k_text = jax.random.split(key, 3)
    ucfg = UNetConfig.from_dict(configs["unet"])
    unet = UNet2DConditionModel(ucfg)
    unet_params = unet.init(k_unet, jnp.zeros((1, 8, 8, ucfg.in_channels)), jnp.zeros((1,)),
                            jnp.zeros((1, 77, ucfg.cross_attention_dim)))["params"]
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    text_params = text.init(k_text, jnp.zeros((1, 77), jnp.int32))["params"]
    rng = np.random.RandomState(seed)
    params = {
        "unet": _sharpen_and_perturb(unet_params, rng, qk_scale, noise),
        "text_encoder": _sharpen_and_perturb(text_params, rng, qk_scale, noise),
    }
    if configs.get("vae") is not None:
        vcfg = VAEConfig.from_dict(configs["vae"])
        vae_params = AutoencoderKL(vcfg).init(k_vae, jnp.zeros((1, 16, 16, vcfg.in_channels)))["params"]
        params["vae"] = _sharpen_and_perturb(vae_params, rng, 1.0, noise)
    return params


def write_model_folder(folder: str, configs: dict, params: dict, words=DEFAULT_WORDS,
                       csg_jax_meta: Optional[dict] = None, weight_dtype=np.float32) -> str:
    """Write a diffusers-format folder from configs + Flax params (PyTorch layout, safetensors)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    components = {
        "unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model.safetensors", "config.json"),
        "text_encoder": ("transformers", "CLIPTextModel", "model.safetensors", "config.json"),
        "vae": ("diffusers", "AutoencoderKL", "diffusion_pytorch_model.safetensors", "config.json"),
    }
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    for comp, (lib, cls, weight_file, cfg_file) in components.items():
        if comp not in params:
            continue
        index[comp] = [lib, cls]
        os.makedirs(os.path.join(folder, comp), exist_ok=True)
        _write_json(os.path.join(folder, comp, cfg_file), configs[comp])
        sd = flax_to_state_dict(params[comp])
        if comp == "text_encoder":  # SD checkpoints keep transformers' "text_model." prefix
            sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
        save_file({k: np.ascontiguousarray(v.astype(weight_dtype)) for k, v in sd.items()},
                  os.path.join(folder, comp, weight_file))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), configs["scheduler"])
    if csg_jax_meta:
        index["csg_jax"] = csg_jax_meta
    _write_json(os.path.join(folder, "model_index.json"), index)
    write_clip_tokenizer(os.path.join(folder, "tokenizer"), words)
    return folder


def make_tiny_model(folder: str, variant: str = "sd1", seed: int = 0, words=DEFAULT_WORDS) -> str:
    """Write a tiny random SD-shaped model folder (see module docstring); returns ``folder``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the vocab size comes from the tokenizer we write
        vocab_size = write_clip_tokenizer(os.path.join(tmp, "tok"), words)
    configs = tiny_configs(variant, vocab_size=vocab_size)
    params = init_params(configs, seed=seed)
    return write_model_folder(folder, configs, params, words=words)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
