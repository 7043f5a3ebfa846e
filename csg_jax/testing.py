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

    def fix(path, v):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] == "kernel" and names[-2] in ("to_q", "to_k", "q_proj", "k_proj"):
            return v * qk_scale
        if names[-1] in ("bias", "scale") and noise:
            return v + noise * rng.standard_normal(v.shape).astype(np.float32)
        return v

    return jax.tree_util.tree_map_with_path(fix, params)


def random_params(template: dict, rng: np.random.RandomState) -> dict:
    """LeCun-normal kernels/embeddings, unit scales, zero biases for an abstract param tree.

    Plain numpy: no compilation of ``init`` (minutes for SD-sized models on a small CPU), and the
    values do not depend on the JAX version, so the embedded model is the same everywhere.
    """

    def draw(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        shape = tuple(leaf.shape)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "bias":
            return np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, template)


def init_params(configs: dict, seed: int = 0, qk_scale: float = 2.0, noise: float = 0.05) -> dict:
    """Random Flax params (numpy) for each component of :func:`tiny_configs` (or any such configs)."""
    key = jax.random.PRNGKey(0)
    rng = np.random.RandomState(seed)
    ucfg = UNetConfig.from_dict(configs["unet"])
    unet_t = jax.eval_shape(UNet2DConditionModel(ucfg).init, key, jnp.zeros((1, 8, 8, ucfg.in_channels)),
                            jnp.zeros((1,)), jnp.zeros((1, 77, ucfg.cross_attention_dim)))["params"]
    text_t = jax.eval_shape(CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).init, key,
                            jnp.zeros((1, 77), jnp.int32))["params"]
    params = {
        "unet": _sharpen_and_perturb(random_params(unet_t, rng), rng, qk_scale, noise),
        "text_encoder": _sharpen_and_perturb(random_params(text_t, rng), rng, qk_scale, noise),
    }
    if configs.get("vae") is not None:
        vcfg = VAEConfig.from_dict(configs["vae"])
        vae_t = jax.eval_shape(AutoencoderKL(vcfg).init, key, jnp.zeros((1, 16, 16, vcfg.in_channels)))["params"]
        params["vae"] = _sharpen_and_perturb(random_params(vae_t, rng), rng, 1.0, noise)
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


def sd15_configs(vocab_size: int = 1000) -> dict:
    """Stable Diffusion 1.5's architecture (UNet 320/640/1280/1280, VAE f=8, CLIP ViT-L/14 text
    encoder) with a small vocabulary: for benchmarks and shape tests with random weights."""
    unet = UNetConfig().to_dict()
    vae = {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215, "act_fn": "silu",
    }
    text = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab_size,
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": dict(SD1_SCHEDULER)}


def make_random_pipeline(configs: dict, seed: int = 0, words=DEFAULT_WORDS, dtype=jnp.float32, param_dtype=jnp.float32):
    """A :class:`~csg_jax.pipeline.Pipeline` with random weights, built in memory (no weight files)."""
    import tempfile

    from csg_jax.pipeline import Pipeline, _load_tokenizer
    from csg_jax.schedule import SchedulerConfig

    tmp = tempfile.mkdtemp(prefix="csg_jax_tok_")
    vocab = write_clip_tokenizer(os.path.join(tmp, "tokenizer"), words)
    configs = dict(configs, text_encoder=dict(configs["text_encoder"], vocab_size=vocab))
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), init_params(configs, seed=seed, noise=0.0))
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), **kw)
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]), **kw)
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]), **kw) if configs.get("vae") else None
    return Pipeline(unet, text, vae, _load_tokenizer(tmp), SchedulerConfig.from_dict(configs["scheduler"]), params,
                    0.18215, source=f"random:{seed}")
