"""UNet2DConditionModel of Stable Diffusion 1.x / 2.x, with attention as explicit state.

Call::

    eps, records = UNet2DConditionModel(config).apply(
        {"params": params}, sample, timesteps, context, control)

* ``sample``    (B, h, w, C_in) latents (NHWC);
* ``timesteps`` (B,) or scalar, int or float;
* ``context``   (B, 77, cross_attention_dim) text-encoder states;
* ``control``   :class:`~csg_jax.models.attention.AttentionControl` or None;
* ``eps``       (B, h, w, C_out) the model output (epsilon or v, per the scheduler config);
* ``records``   ``{layer_name: array}`` for every layer the control asked to record (shapes in
  :mod:`csg_jax.models.attention`).

Layer names are diffusers' module paths (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``);
:func:`attention_layers` lists them with their kind and spatial resolution for a latent size, so
callers can pick e.g. "every cross-attention layer at 16x16 or coarser".

Parameter names follow diffusers' checkpoint keys (see :mod:`csg_jax.convert`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from csg_jax.errors import ConfigError
from csg_jax.models.attention import Attention, AttentionControl
from csg_jax.models.conv import Conv
from csg_jax.models.precision import Dense

_CROSS_DOWN = "CrossAttnDownBlock2D"
_PLAIN_DOWN = "DownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"
_PLAIN_UP = "UpBlock2D"

# config.json keys that must have these values (anything else is an architecture we do not have).
_REQUIRED = {
    "addition_embed_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "resnet_time_scale_shift": ("default",),
    "act_fn": ("silu",),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "center_input_sample": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_time_embed_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0.0, 0),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP)
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)  # diffusers quirk: number of heads per block
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int = 1
    sample_size: int = 64

    @classmethod
    def from_dict(cls, d: dict, source: str = "unet/config.json") -> "UNetConfig":
        for key, allowed in _REQUIRED.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(
                    f"{source}: {key}={d[key]!r} is not supported (csg_jax supports Stable Diffusion 1.x/2.x "
                    f"UNets; expected {allowed[0]!r}). SDXL-style added conditioning and other variants are not implemented."
                )
        for key in ("down_block_types", "up_block_types"):
            for t in d.get(key, ()):
                if t not in (_CROSS_DOWN, _PLAIN_DOWN, _CROSS_UP, _PLAIN_UP):
                    raise ConfigError(f"{source}: block type {t!r} in {key} is not supported")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (int(heads),) * n
        tlpb = d.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)):
            if len(set(tlpb)) != 1:
                raise ConfigError(f"{source}: per-block transformer_layers_per_block {tlpb} is not supported")
            tlpb = tlpb[0]
        lpb = d.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            raise ConfigError(f"{source}: per-block layers_per_block is not supported")
        cross = d.get("cross_attention_dim", 768)
        if isinstance(cross, (list, tuple)):
            raise ConfigError(f"{source}: per-block cross_attention_dim is not supported")
        try:
            return cls(
                in_channels=int(d.get("in_channels", 4)),
                out_channels=int(d.get("out_channels", 4)),
                block_out_channels=tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels)),
                down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
                up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
                layers_per_block=int(lpb),
                attention_head_dim=heads,
                cross_attention_dim=int(cross),
                use_linear_projection=bool(d.get("use_linear_projection", False)),
                upcast_attention=bool(d.get("upcast_attention", False)),
                norm_num_groups=int(d.get("norm_num_groups", 32)),
                norm_eps=float(d.get("norm_eps", 1e-5)),
                flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
                freq_shift=int(d.get("freq_shift", 0)),
                transformer_layers_per_block=int(tlpb),
                sample_size=int(d.get("sample_size", 64)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: malformed value ({e})") from None

    def to_dict(self) -> dict:
        """diffusers-compatible config.json content."""
        d = dataclasses.asdict(self)
        d["attention_head_dim"] = list(self.attention_head_dim)
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            d[k] = list(d[k])
        d["_class_name"] = "UNet2DConditionModel"
        d["act_fn"] = "silu"
        return d


class LayerInfo(NamedTuple):
    name: str  # e.g. "up_blocks.3.attentions.2.transformer_blocks.0.attn1"
    kind: str  # "self" | "cross"
    resolution: tuple[int, int]  # (h, w) of the layer's feature map
    heads: int = 0  # attention heads of the layer


def attention_layers(config: UNetConfig, latent_hw: tuple[int, int]) -> list[LayerInfo]:
    """Every attention layer of the UNet for latents of size ``latent_hw``, in call order."""
    h, w = latent_hw
    n = len(config.block_out_channels)
    res = lambda level: (math.ceil(h / 2**level), math.ceil(w / 2**level))
    out: list[LayerInfo] = []

    def add(prefix, count, level, heads):
        for a in range(count):
            for tb in range(config.transformer_layers_per_block):
                base = f"{prefix}.attentions.{a}.transformer_blocks.{tb}"
                out.append(LayerInfo(base + ".attn1", "self", res(level), heads))
                out.append(LayerInfo(base + ".attn2", "cross", res(level), heads))

    for i, t in enumerate(config.down_block_types):
        if t == _CROSS_DOWN:
            add(f"down_blocks.{i}", config.layers_per_block, i, config.attention_head_dim[i])
    add("mid_block", 1, n - 1, config.attention_head_dim[-1])
    for j, t in enumerate(config.up_block_types):
        if t == _CROSS_UP:
            add(f"up_blocks.{j}", config.layers_per_block + 1, n - 1 - j, config.attention_head_dim[n - 1 - j])
    return out


def _group_norm(groups, eps, dtype, param_dtype, name):
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    return emb


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda name: Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name=name, **kw)
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm1")(x))
        h = conv("conv1")(h)
        h = h + Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm2")(h))
        h = conv("conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return x + h


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` (dim -> 2 * 4 dim), gelu gate, ``net.2`` (4 dim -> dim)."""

    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = 4 * self.dim

        class _GEGLU(nn.Module):
            @nn.compact
            def __call__(s, x):
                h, gate = jnp.split(Dense(2 * inner, name="proj", **kw)(x), 2, axis=-1)
                return h * jax.nn.gelu(gate, approximate=False)

        x = _GEGLU(name="net_0")(x)
        return Dense(self.dim, name="net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    layer_name: str
    upcast: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, control):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, **kw)
        attn = lambda i: Attention(
            self.dim, self.heads, self.dim // self.heads, layer_name=f"{self.layer_name}.attn{i}",
            upcast=self.upcast, name=f"attn{i}", **kw)
        records = {}
        h, rec = attn(1)(ln("norm1")(x), None, control)
        records[f"{self.layer_name}.attn1"] = rec
        x = x + h
        h, rec = attn(2)(ln("norm2")(x), context, control)
        records[f"{self.layer_name}.attn2"] = rec
        x = x + h
        x = x + FeedForward(self.dim, name="ff", **kw)(ln("norm3")(x))
        return x, records


class Transformer2DModel(nn.Module):
    channels: int
    heads: int
    layer_name: str
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, control):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        residual = x
        x = _group_norm(self.config.norm_num_groups, 1e-6, self.dtype, self.param_dtype, "norm")(x)
        if self.config.use_linear_projection:
            x = Dense(c, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = Conv(c, (1, 1), name="proj_in", **kw)(x).reshape(b, h * w, c)
        records = {}
        for i in range(self.config.transformer_layers_per_block):
            x, rec = BasicTransformerBlock(
                c, self.heads, f"{self.layer_name}.transformer_blocks.{i}", self.config.upcast_attention,
                name=f"transformer_blocks_{i}", **kw)(x, context, control)
            records.update(rec)
        if self.config.use_linear_projection:
            x = Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = Conv(c, (1, 1), name="proj_out", **kw)(x.reshape(b, h, w, c))
        return x + residual, records


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, sample, timesteps, context, control: Optional[AttentionControl] = None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        ch = cfg.block_out_channels
        n = len(ch)
        sample = sample.astype(self.dtype)
        context = context.astype(self.dtype)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))

        t_emb = timestep_embedding(timesteps, ch[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(self.dtype)
        time_embedding = TimestepEmbedding(4 * ch[0], name="time_embedding", **kw)
        temb = time_embedding(t_emb)

        records: dict = {}

        h = Conv(ch[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **kw)(sample)
        skips = [h]
        for i, block_type in enumerate(cfg.down_block_types):
            block = DownBlock(ch[i], cfg.attention_head_dim[i], i < n - 1, block_type == _CROSS_DOWN,
                              f"down_blocks.{i}", cfg, name=f"down_blocks_{i}", **kw)
            h, block_skips, rec = block(h, temb, context, control)
            skips.extend(block_skips)
            records.update(rec)

        h, rec = MidBlock(ch[-1], cfg.attention_head_dim[-1], cfg, name="mid_block", **kw)(h, temb, context, control)
        records.update(rec)

        rev_ch = tuple(reversed(ch))
        rev_heads = tuple(reversed(cfg.attention_head_dim))
        for j, block_type in enumerate(cfg.up_block_types):
            count = cfg.layers_per_block + 1
            block_skips, skips = skips[-count:], skips[:-count]
            block = UpBlock(rev_ch[j], rev_heads[j], j < n - 1, block_type == _CROSS_UP,
                            f"up_blocks.{j}", cfg, name=f"up_blocks_{j}", **kw)
            h, rec = block(h, block_skips, temb, context, control)
            records.update(rec)

        h = nn.silu(_group_norm(groups, eps, self.dtype, self.param_dtype, "conv_norm_out")(h))
        h = Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(h)
        return h, {k: v for k, v in records.items() if v is not None}


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.dim, name="linear_1", **kw)(x)
        return Dense(self.dim, name="linear_2", **kw)(nn.silu(x))


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D: resnets (+ transformers), then an optional stride-2 conv."""

    channels: int
    heads: int
    add_downsample: bool
    cross: bool
    layer_name: str
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, control):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cfg = self.config
        skips, records = [], {}
        for r in range(cfg.layers_per_block):
            h = ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{r}", **kw)(h, temb)
            if self.cross:
                h, rec = Transformer2DModel(self.channels, self.heads, f"{self.layer_name}.attentions.{r}", cfg,
                                            name=f"attentions_{r}", **kw)(h, context, control)
                records.update(rec)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(self.channels, name="downsamplers_0", **kw)(h)
            skips.append(h)
        return h, skips, records


class MidBlock(nn.Module):
    channels: int
    heads: int
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, control):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cfg = self.config
        h = ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(h, temb)
        h, records = Transformer2DModel(self.channels, self.heads, "mid_block.attentions.0", cfg,
                                        name="attentions_0", **kw)(h, context, control)
        h = ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(h, temb)
        return h, records


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D: (resnet on [h, skip] (+ transformer)) x (layers+1), then upsample."""

    channels: int
    heads: int
    add_upsample: bool
    cross: bool
    layer_name: str
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, skips: Sequence, temb, context, control):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cfg = self.config
        records = {}
        skips = list(skips)
        for r in range(cfg.layers_per_block + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{r}", **kw)(h, temb)
            if self.cross:
                h, rec = Transformer2DModel(self.channels, self.heads, f"{self.layer_name}.attentions.{r}", cfg,
                                            name=f"attentions_{r}", **kw)(h, context, control)
                records.update(rec)
        if self.add_upsample:
            h = Upsample(self.channels, name="upsamplers_0", **kw)(h)
        return h, records


class Downsample(nn.Module):
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        return Conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(h)


class Upsample(nn.Module):
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, like F.interpolate(scale_factor=2)
        return Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(h)
