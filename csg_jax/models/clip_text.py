"""CLIP text transformer (transformers' ``CLIPTextModel``) as the Stable Diffusion text encoder.

SD uses ``last_hidden_state`` (after the final layer norm) as the cross-attention context:
(B, 77, 768) for SD 1.x (12 layers, quick_gelu) and (B, 77, 1024) for SD 2.x (23 layers, gelu).
Both are this one module; only ``config.json`` differs.

Param names follow the checkpoint keys (see ``csg_jax/convert.py``):
``text_model.encoder.layers.0.self_attn.q_proj.weight`` <->
``params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from csg_jax.errors import ConfigError
from csg_jax.models.precision import Dense

# Checkpoint buffers that are not parameters: pass as ``state_dict_to_flax(..., ignore=IGNORE_KEYS)``.
IGNORE_KEYS = (r"position_ids$",)

# SD checkpoints (and transformers 4.x) store the text encoder under "text_model."; transformers
# 5.x drops that prefix when it saves a CLIPTextModel. Our param tree keeps it, see `canonical_keys`.
KEY_PREFIX = "text_model."

_ACTIVATIONS = {
    # CLIP's own approximation (SD 1.x): x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # transformers' "gelu" is the exact erf GELU (SD 2.x).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers text_encoder ``config.json``.

    Defaults are transformers' ``CLIPTextConfig`` defaults, used for fields a config omits.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"text encoder config: hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(_ACTIVATIONS))})."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"text encoder config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from a ``config.json`` dict; bookkeeping keys (ids, projection_dim, ...) are ignored."""
        model_type = d.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ConfigError(
                f"text encoder config: model_type={model_type!r}, expected 'clip_text_model' "
                "(a CLIP text encoder as in Stable Diffusion 1.x / 2.x)."
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = d.get(f.name)
            if value is None:
                continue  # omitted: transformers' default
            cast = {"hidden_act": str, "layer_norm_eps": float}.get(f.name, int)
            try:
                kwargs[f.name] = cast(value)
            except (TypeError, ValueError):
                raise ConfigError(f"text encoder config: {f.name}={value!r} is malformed.") from None
        return cls(**kwargs)


def canonical_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Give every key the ``text_model.`` prefix (missing in files saved by transformers 5.x)."""
    return {k if k.startswith(KEY_PREFIX) else KEY_PREFIX + k: v for k, v in state_dict.items()}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention. (B, T, C) -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        B, T, C = x.shape
        H = cfg.num_attention_heads
        D = C // H
        dense = lambda name: Dense(C, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q = dense("q_proj")(x).reshape(B, T, H, D)
        k = dense("k_proj")(x).reshape(B, T, H, D)
        v = dense("v_proj")(x).reshape(B, T, H, D)
        # Scores and softmax in float32 even for half-precision activations: the causal mask
        # needs a large negative value, and a 77-wide softmax is cheap.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (D**-0.5)
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, C)
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. (B, T, C) -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _ACTIVATIONS[cfg.hidden_act](x)
        return Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


def _layer_norm(cfg: CLIPTextConfig, dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance: CLIP activations have a few very large channels, where the fast
    # E[x^2] - E[x]^2 formula loses precision.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block. (B, T, C) -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: _layer_norm(self.config, self.dtype, self.param_dtype, name)
        x = x + CLIPAttention(**kw, name="self_attn")(ln("layer_norm1")(x))
        x = x + CLIPMLP(**kw, name="mlp")(ln("layer_norm2")(x))
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings. (B, T) int -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(cfg.vocab_size, **kw, name="token_embedding")(input_ids)
        pos = nn.Embed(cfg.max_position_embeddings, **kw, name="position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tok + pos


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` blocks named ``layers_<i>``. (B, T, C) -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm. (B, T) int -> (B, T, C)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(**kw, name="embeddings")(input_ids)
        x = CLIPEncoder(**kw, name="encoder")(x)
        return _layer_norm(self.config, self.dtype, self.param_dtype, "final_layer_norm")(x)


class CLIPTextModel(nn.Module):
    """SD text encoder: ``input_ids`` (B, T) int32, T <= max_position_embeddings ->
    ``last_hidden_state`` (B, T, hidden_size) in ``dtype``, after the final layer norm.

    No padding mask: SD 1.x / 2.x run the encoder on the full padded 77 tokens, causally masked.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        T = input_ids.shape[-1]
        if input_ids.ndim != 2 or T > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be (batch, tokens) with tokens <= {self.config.max_position_embeddings}; "
                f"got shape {tuple(input_ids.shape)}."
            )
        return CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(input_ids)
