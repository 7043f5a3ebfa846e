"""The shapes model's architecture and parameters: its component configs, the Flax modules,
fresh parameters (drawn with numpy) and parameters loaded from a model folder (``--init-from``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from csg_jax.shapes.train_config import DEFAULT_RECIPE, IMAGE_SIZE, RECIPES
from csg_jax.shapes.train_data import shapes_words
from csg_jax.tokenizer_files import build_vocab_and_merges


def model_configs(vocab_size: Optional[int] = None, beta_schedule: str = RECIPES[DEFAULT_RECIPE][0]) -> dict:
    """config.json contents of each component (diffusers / transformers field names)."""
    if vocab_size is None:
        vocab_size = len(build_vocab_and_merges(shapes_words())[0])
    unet = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 64],
        # Attention at 16x16 and 8x8 only (none at 32x32): 32x32 self-attention maps cost more than
        # the rest of the UNet on a CPU, and 16x16 is the resolution the CSG mask is read at.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 4,  # diffusers quirk: this is the number of heads
        "cross_attention_dim": 64,
        "use_linear_projection": False,
        "upcast_attention": False,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "sample_size": IMAGE_SIZE,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab_size),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
    }
    scheduler = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": beta_schedule,  # beta_start/end are ignored by the cosine schedule
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "v_prediction",
    }
    return {"unet": unet, "text_encoder": text, "scheduler": scheduler}



def build_models(configs: dict, dtype: str = "float32"):
    """(unet, text_encoder) Flax modules; ``dtype`` is the activation dtype, params stay fp32."""
    import jax.numpy as jnp

    from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from csg_jax.models.unet import UNet2DConditionModel, UNetConfig

    act = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), dtype=act)
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]), dtype=act)
    return unet, text


def param_shapes(unet, text) -> dict:
    """Abstract params ``{"unet", "text_encoder"}`` (shapes only: tracing, no computation)."""
    import jax
    import jax.numpy as jnp

    c = unet.config
    key = jax.random.key(0)
    unet_shapes = jax.eval_shape(unet.init, key, jnp.zeros((1, 8, 8, c.in_channels)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1, 77, c.cross_attention_dim)))["params"]
    text_shapes = jax.eval_shape(text.init, key, jnp.zeros((1, 77), jnp.int32))["params"]
    return {"unet": unet_shapes, "text_encoder": text_shapes}


def init_params(unet, text, seed: int, token_embed_std: float = 1.0) -> dict:
    """Fresh float32 params ``{"unet", "text_encoder"}`` as numpy arrays, drawn with numpy.

    Same distributions as Flax's defaults (kernels: LeCun truncated normal over fan-in; biases 0;
    norm scales 1; embeddings: normal with std 1/sqrt(features)), except the text encoder's token
    embedding, std ``token_embed_std``. Why not ``module.init``: run eagerly it compiles hundreds
    of small kernels (minutes on a busy CPU, ptxas per op on a GPU), and jit-compiled its
    threefry calls are slow to compile; numpy takes milliseconds and is the same on every device.
    """
    from csg_jax.convert import flatten, unflatten

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    out = {}
    for comp, tree in param_shapes(unet, text).items():
        flat = {}
        for path, leaf in sorted(flatten(tree).items()):
            shape, name = tuple(leaf.shape), path[-1]
            if name == "bias":
                v = np.zeros(shape)
            elif name == "scale":
                v = np.ones(shape)
            elif name == "kernel":  # Dense (in, out) or Conv (h, w, in, out)
                std = math.sqrt(1.0 / int(np.prod(shape[:-1]))) / 0.87962566103423978  # truncnorm(-2, 2) std
                v = std * _truncated_normal(rng, shape)
            elif name == "embedding":
                std = token_embed_std if path[-2] == "token_embedding" else 1.0 / math.sqrt(shape[-1])
                v = std * rng.standard_normal(shape)
            else:
                raise ValueError(f"no initialiser for parameter {'/'.join(path)}")
            flat[path] = v.astype(np.float32)
        out[comp] = unflatten(flat)
    return out


def _truncated_normal(rng: np.random.Generator, shape: tuple, bound: float = 2.0) -> np.ndarray:
    """Standard normal samples truncated to [-bound, bound] (redraws; ~5% redrawn at 2)."""
    v = rng.standard_normal(shape)
    bad = np.abs(v) > bound
    while bad.any():
        v[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(v) > bound
    return v


def load_params_from_folder(folder: str, unet, text) -> dict:
    """Float32 params ``{"unet", "text_encoder"}`` of a diffusers model folder (e.g. an earlier
    export), checked against this run's parameter shapes."""
    import jax

    from csg_jax.errors import ConfigError
    from csg_jax.pipeline import load_pipeline

    loaded = load_pipeline(folder).params
    params = {k: jax.tree.map(lambda a: np.asarray(a, np.float32), loaded[k]) for k in ("unet", "text_encoder")}
    want = jax.tree.map(lambda a: tuple(a.shape), param_shapes(unet, text))
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if want != got:
        raise ConfigError(f"{folder}: its model does not have this run's architecture; cannot --init-from it")
    return params

