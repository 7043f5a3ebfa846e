"""One Flax vision transformer for the evaluation metrics: CLIP's image tower (CS) and DINO (SD).

Two checkpoint layouts, one computation (pre-LN transformer blocks over [CLS] + patch tokens):

* ``layout="clip"`` -- transformers ``CLIPVisionModel`` (inside ``CLIPModel`` under
  ``vision_model.``): ``embeddings.{class_embedding, patch_embedding (conv, no bias),
  position_embedding}``, ``pre_layrnorm`` (sic), ``encoder.layers.N.{layer_norm1, self_attn.{q,k,v,
  out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm`` applied to the [CLS] state only;
  quick_gelu for OpenAI's checkpoints.
* ``layout="vit"`` -- transformers ``ViTModel`` (``facebook/dino-vitb8``): ``embeddings.{cls_token,
  position_embeddings, patch_embeddings.projection (conv, bias)}``, ``encoder.layer.N.
  {layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
  layernorm_after, intermediate.dense, output.dense}``, final ``layernorm`` over all tokens; gelu.

Param names follow the checkpoint keys, so :func:`csg_jax.convert.state_dict_to_flax` converts
by its tree walk. Position embeddings are interpolated (torch bicubic, align_corners=False,
exactly as transformers' ``interpolate_pos_encoding``) when the patch grid differs from the
trained one.

:class:`CLIPModel` adds the text tower (``csg_jax.models.clip_text``, transformers'
``CLIPTextTransformer``) and the two projections (``visual_projection``, ``text_projection``,
no bias) for image-text similarity.

Loaders (:func:`load_clip`, :func:`load_dino`) read a transformers folder (``config.json`` +
``model.safetensors``, sharded safetensors, or ``pytorch_model.bin`` when torch is installed)
with :mod:`csg_jax.weights`' readers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.convert import state_dict_to_flax
from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from csg_jax.resize import resize_2d
from csg_jax.weights import load_tokenizer, read_json, read_weights

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Buffers and heads in the checkpoints that the metrics do not use.
IGNORE_KEYS = (r"position_ids$", r"^logit_scale$", r"^pooler\.", r"^classifier\.")

_HIGHEST = jax.lax.Precision.HIGHEST

_DEFAULTS = {
    # transformers' CLIPVisionConfig defaults
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 qkv_bias=True),
    # transformers' ViTConfig defaults
    "vit": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-12,
                qkv_bias=True),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of either layout (field names as in transformers' config.json)."""

    layout: str = "vit"  # "clip" | "vit"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    def __post_init__(self):
        if self.layout not in ("clip", "vit"):
            raise ConfigError(f"vision transformer layout {self.layout!r}: expected 'clip' or 'vit'")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"vision transformer: hidden_act={self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision transformer: hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
        """From a transformers config.json: ``clip_vision_model``, ``clip`` (its ``vision_config``)
        or ``vit`` / ``dino`` style (``model_type`` "vit"). Bookkeeping keys are ignored."""
        model_type = d.get("model_type", "vit")
        if model_type == "clip":
            d = d.get("vision_config") or {}
            model_type = "clip_vision_model"
        if model_type == "clip_vision_model":
            layout = "clip"
        elif model_type in ("vit", "dino"):
            layout = "vit"
        else:
            raise ConfigError(f"vision config: model_type={model_type!r}; expected 'clip', 'clip_vision_model' or 'vit'")
        kwargs = dict(_DEFAULTS[layout], layout=layout)
        casts = {"hidden_act": str, "layer_norm_eps": float, "qkv_bias": bool}
        for f in dataclasses.fields(cls):
            if f.name == "layout" or d.get(f.name) is None:
                continue
            try:
                kwargs[f.name] = casts.get(f.name, int)(d[f.name])
            except (TypeError, ValueError):
                raise ConfigError(f"vision config: {f.name}={d[f.name]!r} is malformed") from None
        return cls(**kwargs)


def _ln(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, precision=_HIGHEST, name=name)


def _attend(cfg: ViTConfig, q, k, v):
    """Softmax attention over all tokens. (B, T, C) x3 -> (B, T, C), heads concatenated."""
    B, T, C = q.shape
    H = cfg.num_attention_heads
    D = C // H
    split = lambda t: t.reshape(B, T, H, D)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k), precision=_HIGHEST) * (D**-0.5)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, split(v), precision=_HIGHEST).reshape(B, T, C)


class _QKV(nn.Module):
    """q/k/v projections named as in the checkpoint; returns (attention output, keys)."""

    config: ViTConfig
    names: tuple = ("q_proj", "k_proj", "v_proj")

    @nn.compact
    def __call__(self, x):
        C, bias = self.config.hidden_size, self.config.qkv_bias
        q, k, v = (_dense(C, n, bias)(x) for n in self.names)
        return _attend(self.config, q, k, v), k


class _DenseIn(nn.Module):
    """A module holding one Dense called ``dense`` (transformers' ViTSelfOutput / ViTIntermediate / ViTOutput)."""

    features: int

    @nn.compact
    def __call__(self, x):
        return _dense(self.features, "dense")(x)


class _ViTAttention(nn.Module):
    """``attention.attention.{query,key,value}`` + ``attention.output.dense``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        a, k = _QKV(self.config, ("query", "key", "value"), name="attention")(x)
        return _DenseIn(self.config.hidden_size, name="output")(a), k


class _CLIPAttention(nn.Module):
    """``self_attn.{q,k,v,out}_proj``. Returns (output, keys)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        C, bias = self.config.hidden_size, self.config.qkv_bias
        q, k, v = (_dense(C, n, bias)(x) for n in ("q_proj", "k_proj", "v_proj"))
        return _dense(C, "out_proj")(_attend(self.config, q, k, v)), k


class _CLIPMLP(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        x = _ACTIVATIONS[self.config.hidden_act](_dense(self.config.intermediate_size, "fc1")(x))
        return _dense(self.config.hidden_size, "fc2")(x)


class ViTLayer(nn.Module):
    """One pre-LN block. (B, T, C) -> ((B, T, C), keys (B, T, C))."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = _ACTIVATIONS[cfg.hidden_act]
        if cfg.layout == "clip":
            a, k = _CLIPAttention(cfg, name="self_attn")(_ln(cfg, "layer_norm1")(x))
            x = x + a
            return x + _CLIPMLP(cfg, name="mlp")(_ln(cfg, "layer_norm2")(x)), k
        a, k = _ViTAttention(cfg, name="attention")(_ln(cfg, "layernorm_before")(x))
        x = x + a
        h = act(_DenseIn(cfg.intermediate_size, name="intermediate")(_ln(cfg, "layernorm_after")(x)))
        return x + _DenseIn(cfg.hidden_size, name="output")(h), k


class _Encoder(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        prefix = "layers" if self.config.layout == "clip" else "layer"
        keys = None
        for i in range(self.config.num_hidden_layers):
            x, keys = ViTLayer(self.config, name=f"{prefix}_{i}")(x)
        return x, keys


def interpolate_positions(patch_pos: jax.Array, grid: int, hw: tuple[int, int]) -> jax.Array:
    """(grid*grid, C) trained patch position embeddings -> (h*w, C) for an h x w patch grid.

    transformers' ``interpolate_pos_encoding``: torch bicubic, size=(h, w), align_corners=False.
    """
    if tuple(hw) == (grid, grid):
        return patch_pos
    C = patch_pos.shape[-1]
    p = resize_2d(patch_pos.reshape(grid, grid, C), hw, "bicubic", axes=(0, 1))
    return p.reshape(hw[0] * hw[1], C)


class _Embeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        C, P, g = cfg.hidden_size, cfg.patch_size, cfg.grid
        clip = cfg.layout == "clip"
        if clip:
            x = nn.Conv(C, (P, P), strides=(P, P), padding="VALID", use_bias=False, precision=_HIGHEST,
                        name="patch_embedding")(pixels)
            cls = self.param("class_embedding", nn.initializers.normal(0.02), (C,))
            pos = nn.Embed(g * g + 1, C, name="position_embedding").embedding
        else:
            x = _PatchEmbeddings(cfg, name="patch_embeddings")(pixels)
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, C)).reshape(C)
            pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, g * g + 1, C))[0]
        B, h, w, _ = x.shape
        x = x.reshape(B, h * w, C)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (B, 1, C)), x], axis=1)
        pos = jnp.concatenate([pos[:1], interpolate_positions(pos[1:], g, (h, w))], axis=0)
        return x + pos[None]


class _PatchEmbeddings(nn.Module):
    """``patch_embeddings.projection`` (conv with bias)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels):
        P = self.config.patch_size
        return nn.Conv(self.config.hidden_size, (P, P), strides=(P, P), padding="VALID", precision=_HIGHEST,
                       name="projection")(pixels)


class ViT(nn.Module):
    """pixels (B, H, W, 3), already normalised -> dict:

    * ``last_hidden_state`` (B, 1 + h*w, C): CLIP: encoder output (no final norm, as transformers);
      ViT: after the final ``layernorm``.
    * ``pooled`` (B, C): CLIP: ``post_layernorm`` of the [CLS] state (CLIP's image embedding before
      ``visual_projection``); ViT: the normed [CLS] state.
    * ``keys`` (B, 1 + h*w, C): the key projection of the last block (heads concatenated along C,
      head-major as in the checkpoint), the features of Splice's structure distance.

    h, w = H // patch, W // patch (trailing pixels are dropped like torch's strided conv).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> dict:
        cfg = self.config
        x = _Embeddings(cfg, name="embeddings")(pixels.astype(jnp.float32))
        if cfg.layout == "clip":
            x = _ln(cfg, "pre_layrnorm")(x)
        x, keys = _Encoder(cfg, name="encoder")(x)
        if cfg.layout == "clip":
            return {"last_hidden_state": x, "pooled": _ln(cfg, "post_layernorm")(x[:, 0]), "keys": keys}
        x = _ln(cfg, "layernorm")(x)
        return {"last_hidden_state": x, "pooled": x[:, 0], "keys": keys}


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel`` without the logit scale: image and text embeddings.

    ``image_features(pixels (B, S, S, 3) CLIP-normalised) -> (B, projection_dim)``;
    ``text_features(input_ids (B, T) int32) -> (B, projection_dim)`` (the EOS state: transformers'
    rule, ``argmax(ids)`` for legacy configs with ``eos_token_id == 2`` else the first EOS).
    Not normalised.
    """

    text_config: CLIPTextConfig
    vision_config: ViTConfig
    projection_dim: int = 512
    eos_token_id: int = 2

    def setup(self):
        self.text_model = CLIPTextTransformer(self.text_config)
        self.vision_model = ViT(self.vision_config)
        self.visual_projection = _dense(self.projection_dim, "visual_projection", use_bias=False)
        self.text_projection = _dense(self.projection_dim, "text_projection", use_bias=False)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)["pooled"])

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        h = self.text_model(input_ids)
        if self.eos_token_id == 2:
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return self.text_projection(h[jnp.arange(h.shape[0]), pos])

    def __call__(self, pixels, input_ids):
        return self.image_features(pixels), self.text_features(input_ids)


# --- loading -----------------------------------------------------------------------------------

def _strip(sd: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


@dataclasses.dataclass
class LoadedCLIP:
    model: CLIPModel
    params: dict
    tokenizer: Any
    folder: str

    @property
    def image_size(self) -> int:
        return self.model.vision_config.image_size

    @property
    def max_length(self) -> int:
        return self.model.text_config.max_position_embeddings


@dataclasses.dataclass
class LoadedViT:
    model: ViT
    params: dict
    folder: str


def clip_from_config(d: Mapping[str, Any]) -> CLIPModel:
    """A :class:`CLIPModel` from a transformers ``CLIPModel`` config.json dict."""
    if d.get("model_type", "clip") != "clip":
        raise ConfigError(f"CLIP config: model_type={d.get('model_type')!r}, expected 'clip' (a CLIPModel folder "
                          "such as openai/clip-vit-base-patch32)")
    text = dict(d.get("text_config") or {}, model_type="clip_text_model")
    vision = dict(d.get("vision_config") or {}, model_type="clip_vision_model")
    return CLIPModel(CLIPTextConfig.from_dict(text), ViTConfig.from_dict(vision),
                     projection_dim=int(d.get("projection_dim", 512)),
                     eos_token_id=int(text.get("eos_token_id", 2)))


def clip_template(model: CLIPModel) -> dict:
    s = model.vision_config.image_size
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                          jnp.zeros((1, model.text_config.max_position_embeddings), jnp.int32))["params"]


def load_clip(folder: str) -> LoadedCLIP:
    """A transformers ``CLIPModel`` folder (``openai/clip-vit-base-patch32``, ``-large-patch14``):
    config.json, model.safetensors (or pytorch_model.bin), vocab.json + merges.txt."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"CLIP folder not found: {folder}")
    model = clip_from_config(read_json(os.path.join(folder, "config.json")))
    params = state_dict_to_flax(read_weights(folder), clip_template(model), source=folder, ignore=IGNORE_KEYS)
    return LoadedCLIP(model, params, load_tokenizer(folder), folder)


def vit_template(model: ViT) -> dict:
    s = model.config.image_size
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.config.num_channels)))["params"]


_NEW_VIT_KEYS = [  # transformers >= 5 in-memory ViT names -> the checkpoint names it saves and the Hub holds
    (re.compile(r"^layers\.(\d+)\.attention\.q_proj\."), r"encoder.layer.\1.attention.attention.query."),
    (re.compile(r"^layers\.(\d+)\.attention\.k_proj\."), r"encoder.layer.\1.attention.attention.key."),
    (re.compile(r"^layers\.(\d+)\.attention\.v_proj\."), r"encoder.layer.\1.attention.attention.value."),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\."), r"encoder.layer.\1.\2."),
]


def canonical_vit_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip a ``vit.`` prefix and map transformers-5 module names to the checkpoint layout."""
    out = {}
    for k, v in _strip(sd, ("vit.",)).items():
        for pat, rep in _NEW_VIT_KEYS:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def load_dino(folder: str) -> LoadedViT:
    """A transformers ``ViTModel`` folder (``facebook/dino-vitb8``): config.json + weights.
    A ``vit.`` prefix (ViTForImageClassification checkpoints) is stripped; pooler/classifier ignored."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"DINO folder not found: {folder}")
    cfg = ViTConfig.from_dict(read_json(os.path.join(folder, "config.json")))
    if cfg.layout != "vit":
        raise ConfigError(f"{folder}: expected a ViT (model_type 'vit') config for DINO, found a CLIP config")
    model = ViT(cfg)
    sd = canonical_vit_keys(read_weights(folder))
    params = state_dict_to_flax(sd, vit_template(model), source=folder, ignore=IGNORE_KEYS)
    return LoadedViT(model, params, folder)
