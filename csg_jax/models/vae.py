"""Flax linen ``AutoencoderKL``: the Stable Diffusion 1.x/2.x VAE, matching diffusers.

Layout is NHWC throughout: images ``(B, H, W, in_channels)`` in ``[-1, 1]``, latents
``(B, H/f, W/f, latent_channels)`` with ``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD).

Module and parameter names follow the diffusers checkpoint keys (see
``docs/CONVENTIONS.md``), so a diffusers ``diffusion_pytorch_model.safetensors`` converts with
:func:`csg_jax.convert.state_dict_to_flax`. Checkpoints written with the deprecated attention
names (``query``/``key``/``value``/``proj_attn``) first go through :func:`fix_legacy_keys`.

The latent scaling factor is *not* applied here: the pipeline multiplies encoder means by
``config.scaling_factor`` and divides latents by it before :meth:`AutoencoderKL.decode`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.models.conv import Conv
from csg_jax.models.precision import Dense

Dtype = Any

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

_SUPPORTED_DOWN = ("DownEncoderBlock2D",)
_SUPPORTED_UP = ("UpDecoderBlock2D",)
# diffusers' get_activation maps both names to nn.SiLU.
_SUPPORTED_ACT = ("silu", "swish")
# config.json keys that do not change the network (or only matter to torch).
_IGNORED_KEYS = frozenset({"force_upcast"})


def _int(d: Mapping[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"VAE config: '{key}' must be a positive integer, got {value!r}.")
    return value


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"VAE config: '{key}' must be true or false, got {value!r}.")
    return value


def _str_tuple(d: Mapping[str, Any], key: str, default: tuple[str, ...], supported: tuple[str, ...]) -> tuple[str, ...]:
    value = d.get(key, default)
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"VAE config: '{key}' must be a non-empty list of block type names, got {value!r}.")
    for v in value:
        if v not in supported:
            raise ConfigError(
                f"VAE config: '{key}' contains unsupported block type {v!r}; "
                f"only {', '.join(repr(s) for s in supported)} is supported (the Stable Diffusion VAE)."
            )
    return tuple(value)


def _optional_float_tuple(d: Mapping[str, Any], key: str) -> tuple[float, ...] | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"VAE config: '{key}' must be null or a list of numbers, got {value!r}.")
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a diffusers ``AutoencoderKL`` (defaults are diffusers' defaults).

    ``scaling_factor`` (and, for VAEs that have them, ``shift_factor`` / ``latents_mean`` /
    ``latents_std``) are carried for the pipeline; the module itself does not use them.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample_factor(self) -> int:
        """Spatial ratio between images and latents (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Build from a diffusers vae ``config.json`` dict.

        Bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) and ``force_upcast`` are
        ignored, as are keys this diffusers class does not know (diffusers ignores them too).
        Raises :class:`ConfigError` for values we do not support.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"VAE config must be a JSON object, got {type(d).__name__}.")
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != "AutoencoderKL":
            raise ConfigError(
                f"VAE config: '_class_name' is {cls_name!r}; only 'AutoencoderKL' (the Stable Diffusion VAE) "
                "is supported."
            )

        act_fn = d.get("act_fn", "silu")
        if act_fn not in _SUPPORTED_ACT:
            raise ConfigError(f"VAE config: 'act_fn' is {act_fn!r}; only 'silu' is supported.")

        boc = d.get("block_out_channels", (64,))
        if (
            isinstance(boc, (str, bytes))
            or not isinstance(boc, (list, tuple))
            or not boc
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in boc)
        ):
            raise ConfigError(f"VAE config: 'block_out_channels' must be a non-empty list of positive ints, got {boc!r}.")
        boc = tuple(boc)

        down = _str_tuple(d, "down_block_types", ("DownEncoderBlock2D",), _SUPPORTED_DOWN)
        up = _str_tuple(d, "up_block_types", ("UpDecoderBlock2D",), _SUPPORTED_UP)
        for key, types in (("down_block_types", down), ("up_block_types", up)):
            if len(types) != len(boc):
                raise ConfigError(
                    f"VAE config: '{key}' has {len(types)} entries but 'block_out_channels' has {len(boc)}; "
                    "they must have the same length."
                )

        groups = _int(d, "norm_num_groups", 32)
        bad = [c for c in boc if c % groups]
        if bad:
            raise ConfigError(
                f"VAE config: 'norm_num_groups'={groups} does not divide the channel counts {bad} of "
                "'block_out_channels'."
            )

        sample_size = d.get("sample_size", 32)
        if isinstance(sample_size, list):
            sample_size = tuple(sample_size)

        scaling = d.get("scaling_factor", 0.18215)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
            raise ConfigError(f"VAE config: 'scaling_factor' must be a number, got {scaling!r}.")
        shift = d.get("shift_factor")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float))):
            raise ConfigError(f"VAE config: 'shift_factor' must be null or a number, got {shift!r}.")

        return cls(
            in_channels=_int(d, "in_channels", 3),
            out_channels=_int(d, "out_channels", 3),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=boc,
            layers_per_block=_int(d, "layers_per_block", 1),
            latent_channels=_int(d, "latent_channels", 4),
            norm_num_groups=groups,
            sample_size=sample_size,
            scaling_factor=float(scaling),
            shift_factor=None if shift is None else float(shift),
            latents_mean=_optional_float_tuple(d, "latents_mean"),
            latents_std=_optional_float_tuple(d, "latents_std"),
            act_fn="silu",
            mid_block_add_attention=_bool(d, "mid_block_add_attention", True),
            use_quant_conv=_bool(d, "use_quant_conv", True),
            use_post_quant_conv=_bool(d, "use_post_quant_conv", True),
        )


# ---------------------------------------------------------------------------------------------
# Legacy checkpoint keys
# ---------------------------------------------------------------------------------------------

#: Deprecated attention parameter names of old diffusers VAE checkpoints -> current names.
#: Applied only inside ``mid_block.attentions.<i>.`` (see :func:`fix_legacy_keys`).
RENAMES: tuple[tuple[str, str], ...] = (
    ("query", "to_q"),
    ("key", "to_k"),
    ("value", "to_v"),
    ("proj_attn", "to_out.0"),
)


def fix_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename deprecated VAE attention keys to the current diffusers names.

    ``...mid_block.attentions.<i>.query.weight`` -> ``...mid_block.attentions.<i>.to_q.weight``,
    likewise ``key`` -> ``to_k``, ``value`` -> ``to_v``, ``proj_attn`` -> ``to_out.0``. Other keys
    are unchanged; arrays are not touched (1x1-conv shaped ``(C, C, 1, 1)`` weights are squeezed
    by :func:`csg_jax.convert.state_dict_to_flax`). Returns a new dict. Raises
    :class:`CheckpointError` if a file holds both the old and the new name of one tensor.
    """
    renames = dict(RENAMES)
    out: dict[str, Any] = {}
    renamed_from: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = key
        parts = key.split(".")
        # ... mid_block . attentions . <i> . <old name> . <weight|bias>
        if (
            len(parts) >= 5
            and parts[-5] == "mid_block"
            and parts[-4] == "attentions"
            and parts[-3].isdigit()
            and parts[-2] in renames
        ):
            new_key = ".".join(parts[:-2] + [renames[parts[-2]], parts[-1]])
        if new_key in out:
            other = renamed_from.get(new_key, new_key)
            raise CheckpointError(
                f"VAE checkpoint holds both '{key}' and '{other}', which are the same tensor under its old "
                "and new name; the file is inconsistent."
            )
        out[new_key] = value
        if new_key != key:
            renamed_from[new_key] = key
    return out


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _group_norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance: the VAE decoder has large activations, E[x^2]-E[x]^2 loses precision.
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, padding: Any = None, strides: int = 1) -> Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding. ``(B, H, W, Cin) -> (B, H, W, out_channels)``."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _group_norm(self.groups, self.dtype, self.param_dtype, "norm1")(x)
        h = nn.silu(h)
        h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv1")(h)
        h = _group_norm(self.groups, self.dtype, self.param_dtype, "norm2")(h)
        h = nn.silu(h)
        h = _conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, self.param_dtype, "conv_shortcut")(x)
        return x + h


class VAEAttention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block (diffusers ``Attention`` with
    ``group_norm``, ``residual_connection=True``, head dim = channels). ``(B, H, W, C) -> same``."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _group_norm(self.groups, self.dtype, self.param_dtype, "group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        dense = lambda name: Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        q = dense("to_q")(h)
        k = dense("to_k")(h)
        v = dense("to_v")(h)
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c**-0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = dense("to_out_0")(out)
        return x + out.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` as used in the VAE: resnet, [attention], resnet."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **kw)(x)


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(padding=0)``: zero-pad right/bottom by 1, then 3x3 stride-2 conv.
    ``(B, H, W, C) -> (B, H//2, W//2, C)`` (for even H, W)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv", padding="VALID", strides=2)(x)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest 2x upsample, then 3x3 conv.
    ``(B, H, W, C) -> (B, 2H, 2W, C)``."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, self.param_dtype, "conv")(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, self.dtype, self.param_dtype, name=f"resnets_{i}"
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, self.param_dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, self.groups, self.dtype, self.param_dtype, name=f"resnets_{i}"
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """``(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels)`` (before ``quant_conv``)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        boc = cfg.block_out_channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(boc[0], 3, name="conv_in", **kw)(x)
        for i, _ in enumerate(cfg.down_block_types):
            x = DownEncoderBlock2D(
                out_channels=boc[i],
                num_layers=cfg.layers_per_block,
                groups=cfg.norm_num_groups,
                add_downsample=i != len(boc) - 1,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        x = MidBlock(boc[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = _group_norm(cfg.norm_num_groups, self.dtype, self.param_dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        return _conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """``(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)`` (after ``post_quant_conv``)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        rev = tuple(reversed(cfg.block_out_channels))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(rev[0], 3, name="conv_in", **kw)(z)
        x = MidBlock(rev[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, _ in enumerate(cfg.up_block_types):
            x = UpDecoderBlock2D(
                out_channels=rev[i],
                num_layers=cfg.layers_per_block + 1,
                groups=cfg.norm_num_groups,
                add_upsample=i != len(rev) - 1,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = _group_norm(cfg.norm_num_groups, self.dtype, self.param_dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        return _conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE (diffusers ``AutoencoderKL``), NHWC.

    Use ``model.apply(params, images, method=AutoencoderKL.encode)`` and
    ``model.apply(params, latents, method=AutoencoderKL.decode)``; ``model.init(rng, images)``
    (which runs ``__call__``: encode, take the mean, decode) creates every parameter.
    No latent scaling factor is applied here.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, name=None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, name=None, **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images (B, H, W, in_channels)`` in [-1, 1] -> ``(mean, logvar)``, each
        ``(B, H/f, W/f, latent_channels)``; ``logvar`` clipped to [-30, 20] as in diffusers."""
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """``latents (B, h, w, latent_channels)`` (unscaled) -> images ``(B, h*f, w*f, out_channels)``,
        roughly in [-1, 1] (not clipped)."""
        z = latents
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean: ``(B, H, W, C) -> (B, H, W, out_channels)``."""
        mean, _ = self.encode(images)
        return self.decode(mean)
