"""torchvision ``vgg16().features`` (and ``alexnet`` / ``squeezenet1_1``) in Flax, perceptual distance, LPIPS.

One module, :class:`ConvFeatures`, runs a torchvision ``features`` ``nn.Sequential`` whose layer
indices are the checkpoint's: ``features.0.weight`` <-> ``params["features_0"]["kernel"]``
(conv 3x3 pad 1 / ReLU / 2x2 max-pool for VGG-16; AlexNet: 11x11 stride 4, 5x5, 3x3 convs and
3x3 stride-2 pools; SqueezeNet 1.1: a 3x3 stride-2 conv, ``Fire`` modules ``features.N.squeeze`` /
``expand1x1`` / ``expand3x3`` and 3x3 stride-2 ``ceil_mode`` pools). It returns the activations after
the ReLUs that the metrics tap:

* relational distance (RD, Eq. 19) uses Johnson et al.'s perceptual (feature reconstruction)
  distance ``sum_l ||phi_l(x) - phi_l(y)||^2 / (C_l H_l W_l)`` over relu1_2, relu2_2, relu3_3,
  relu4_3 of VGG-16 on ImageNet-normalised [0, 1] images;
* LPIPS (Zhang et al.; the ``lpips`` package, v0.1) uses relu1_2 .. relu5_3 (AlexNet: relu1 ..
  relu5; SqueezeNet: relu1 = features.1 and relu2 .. relu7 = the Fire outputs at features.4, 7, 9,
  10, 11, 12, the lpips ``squeeze`` slices) on inputs in [-1, 1] shifted/scaled by its
  ``ScalingLayer``; per layer: unit-normalise
  channels (``x / (||x||_2 + 1e-10)``), squared difference, a 1x1 conv to one channel
  (``lin{k}.model.1.weight`` of the lpips ``vgg.pth`` / ``alex.pth`` / ``squeeze.pth``), then a spatial mean
  (scalar LPIPS) or a bilinear upsampling to the input size (``spatial=True`` maps, used for
  BG-LPIPS); the layers are summed.

A torchvision state dict's ``classifier.*`` tensors are ignored. Tiny test networks use the same
layer indices with fewer channels (``widths``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.convert import state_dict_to_flax
from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.resize import resize_2d
from csg_jax.weights import read_weights

_HIGHEST = jax.lax.Precision.HIGHEST

JOHNSON_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
LPIPS_LAYERS = {"vgg16": ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
                "alexnet": ("relu1", "relu2", "relu3", "relu4", "relu5"),
                "squeezenet1_1": ("relu1", "relu2", "relu3", "relu4", "relu5", "relu6", "relu7")}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# squeezenet1_1: the first conv's width, then (squeeze, expand1x1, expand3x3) of the 8 Fire modules
_DEFAULT_WIDTHS = {"vgg16": (64, 128, 256, 512, 512), "alexnet": (64, 192, 384, 256, 256),
                   "squeezenet1_1": (64, (16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
                                     (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256))}
_FIRE_INDICES = (3, 4, 6, 7, 9, 10, 11, 12)  # torchvision squeezenet1_1.features indices of the Fire modules
_FIRE_TAPS = {4: "relu2", 7: "relu3", 9: "relu4", 10: "relu5", 11: "relu6", 12: "relu7"}


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
    """arch: "vgg16" | "alexnet" | "squeezenet1_1"; widths: output channels of the 5 stages (VGG) /
    5 convs (AlexNet) / the first conv then (squeeze, expand1x1, expand3x3) per Fire (SqueezeNet)."""

    arch: str = "vgg16"
    widths: tuple = (64, 128, 256, 512, 512)

    def __post_init__(self):
        if self.arch not in _DEFAULT_WIDTHS:
            raise ConfigError(f"unknown conv net {self.arch!r}; expected one of {sorted(_DEFAULT_WIDTHS)}")
        want = len(_DEFAULT_WIDTHS[self.arch])
        if len(self.widths) != want:
            raise ConfigError(f"{self.arch}: widths needs {want} entries, got {self.widths}")

    @classmethod
    def default(cls, arch: str = "vgg16") -> "ConvNetConfig":
        return cls(arch, _DEFAULT_WIDTHS[arch])

    def layers(self) -> list[tuple]:
        """torchvision's ``features`` as (index, kind, args): ("conv", out, kernel, stride, pad),
        ("relu", name), ("pool", kernel, stride, ceil_mode), ("fire", squeeze, e1x1, e3x3, tap name
        or None) -- a Fire's output is already after its ReLUs."""
        out: list[tuple] = []
        if self.arch == "squeezenet1_1":
            fires = iter(self.widths[1:])
            out += [("conv", self.widths[0], 3, 2, 0), ("relu", "relu1")]
            for i in range(2, 13):
                out.append(("fire",) + tuple(next(fires)) + (_FIRE_TAPS.get(i),) if i in _FIRE_INDICES
                           else ("pool", 3, 2, True))
        elif self.arch == "vgg16":
            for stage, (n, w) in enumerate(zip((2, 2, 3, 3, 3), self.widths), start=1):
                for j in range(1, n + 1):
                    out.append(("conv", w, 3, 1, 1))
                    out.append(("relu", f"relu{stage}_{j}"))
                out.append(("pool", 2, 2, False))
        else:
            w = self.widths
            out += [("conv", w[0], 11, 4, 2), ("relu", "relu1"), ("pool", 3, 2, False),
                    ("conv", w[1], 5, 1, 2), ("relu", "relu2"), ("pool", 3, 2, False),
                    ("conv", w[2], 3, 1, 1), ("relu", "relu3"),
                    ("conv", w[3], 3, 1, 1), ("relu", "relu4"),
                    ("conv", w[4], 3, 1, 1), ("relu", "relu5"), ("pool", 3, 2, False)]
        return [(i,) + layer for i, layer in enumerate(out)]

    def taps(self) -> tuple:
        """Every tap name, in order."""
        return tuple(l[2] if l[1] == "relu" else l[5] for l in self.layers()
                     if l[1] == "relu" or (l[1] == "fire" and l[5]))

    def channels(self, tap: str) -> int:
        last = None
        for layer in self.layers():
            if layer[1] == "conv":
                last = layer[2]
            if layer[1] == "fire":
                last = layer[3] + layer[4]
                if layer[5] == tap:
                    return last
            if layer[1] == "relu" and layer[2] == tap:
                return last
        raise KeyError(tap)


class _Fire(nn.Module):
    """torchvision's SqueezeNet ``Fire``: 1x1 squeeze + ReLU, then [1x1 expand + ReLU, 3x3 expand
    (pad 1) + ReLU] concatenated on channels."""

    squeeze: int
    e1: int
    e3: int

    @nn.compact
    def __call__(self, x):
        conv = lambda c, k, name: nn.Conv(c, (k, k), padding=((k // 2, k // 2),) * 2, precision=_HIGHEST, name=name)
        x = jax.nn.relu(conv(self.squeeze, 1, "squeeze")(x))
        return jnp.concatenate([jax.nn.relu(conv(self.e1, 1, "expand1x1")(x)),
                                jax.nn.relu(conv(self.e3, 3, "expand3x3")(x))], axis=-1)


def _max_pool(x, k: int, s: int, ceil: bool):
    """torch ``MaxPool2d(k, s, ceil_mode=ceil)`` without padding: ceil mode adds a last, partial
    window (padded with -inf) when the stride does not divide the remainder."""
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n - k) // s) + 1 if ceil else (n - k) // s + 1
        pads.append((0, max((out - 1) * s + k - n, 0)))
    return nn.max_pool(x, (k, k), strides=(s, s), padding=tuple(pads))


class ConvFeatures(nn.Module):
    """(B, H, W, 3) normalised images -> {tap name: (B, h, w, C) activation after that ReLU}.

    Runs the layers up to the last requested tap only (``taps`` is static).
    """

    config: ConvNetConfig
    taps: tuple = JOHNSON_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array) -> dict:
        want = set(self.taps)
        missing = want - set(self.config.taps())
        if missing:
            raise ValueError(f"{self.config.arch} has no layers {sorted(missing)}")
        out = {}
        x = x.astype(jnp.float32)
        for layer in self.config.layers():
            i, kind = layer[:2]
            if kind == "conv":
                _, _, c, k, s, p = layer
                x = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)), precision=_HIGHEST,
                            name=f"features_{i}")(x)
            elif kind == "relu":
                x = jax.nn.relu(x)
                if layer[2] in want:
                    out[layer[2]] = x
                    if len(out) == len(want):
                        break
            elif kind == "fire":
                _, _, sq, e1, e3, tap = layer
                x = _Fire(sq, e1, e3, name=f"features_{i}")(x)
                if tap in want:
                    out[tap] = x
                    if len(out) == len(want):
                        break
            else:
                _, _, k, s, ceil = layer
                x = _max_pool(x, k, s, ceil)
        return out


class _NetLin(nn.Module):
    """lpips ``NetLinLayer``: (Dropout,) 1x1 conv to one channel, no bias -> ``model.1``."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 1), use_bias=False, precision=_HIGHEST, name="model_1")(x)[..., 0]


class LPIPSHeads(nn.Module):
    """``lin0 .. lin{L-1}``: per-layer weighted channel sums. {tap: (B, h, w, C)} -> [(B, h, w)]."""

    config: ConvNetConfig

    @nn.compact
    def __call__(self, diffs: Sequence[jax.Array]) -> list:
        return [_NetLin(name=f"lin{k}")(d) for k, d in enumerate(diffs)]


def _unit(x, eps=1e-10):
    return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


def lpips(trunk_params: dict, head_params: dict, config: ConvNetConfig, a: jax.Array, b: jax.Array) -> dict:
    """LPIPS between images ``a`` and ``b`` (B, H, W, 3) in [-1, 1].

    Returns ``{"map": (B, H, W)`` spatial LPIPS (lpips' ``spatial=True``: each layer's map
    bilinearly upsampled to H x W, align_corners=False, then summed), ``"value": (B,)`` (lpips'
    default: spatial mean of each layer's map, summed)``}``.
    """
    taps = LPIPS_LAYERS[config.arch]
    net = ConvFeatures(config, taps)
    shift, scale = jnp.asarray(LPIPS_SHIFT), jnp.asarray(LPIPS_SCALE)
    # one batch for both images: identical inputs give bit-identical features (LPIPS exactly 0)
    f = net.apply({"params": trunk_params}, (jnp.concatenate([a, b]) - shift) / scale)
    B = a.shape[0]
    fa, fb = {t: v[:B] for t, v in f.items()}, {t: v[B:] for t, v in f.items()}
    diffs = [(_unit(fa[t]) - _unit(fb[t])) ** 2 for t in taps]
    maps = LPIPSHeads(config).apply({"params": head_params}, diffs)
    H, W = a.shape[1:3]
    value = sum(m.mean(axis=(1, 2)) for m in maps)
    full = sum(resize_2d(m, (H, W), "bilinear", axes=(1, 2)) for m in maps)
    # LPIPS(x, x) = 0 exactly (backends may round batch rows differently, ~1e-15)
    same = jnp.all(a == b, axis=(1, 2, 3))
    return {"map": jnp.where(same[:, None, None], 0.0, full), "value": jnp.where(same, 0.0, value)}


def perceptual_features(params: dict, config: ConvNetConfig, images01: jax.Array,
                        taps: tuple = JOHNSON_LAYERS) -> dict:
    """Johnson et al.'s features: ImageNet-normalised (B, H, W, 3) [0, 1] images -> {tap: (B, h, w, C)}."""
    x = (images01 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return ConvFeatures(config, taps).apply({"params": params}, x)


def pairwise_perceptual(fa: dict, fb: dict) -> jax.Array:
    """(Ba, Bb) perceptual distances between two batches of features:
    ``sum_l ||f_l(a_i) - f_l(b_j)||^2 / (C_l H_l W_l)`` (via norms and a Gram product, clamped >= 0)."""
    total = 0.0
    for t in fa:
        a = fa[t].reshape(fa[t].shape[0], -1)
        b = fb[t].reshape(fb[t].shape[0], -1)
        n = a.shape[1]
        na = jnp.sum(a * a, axis=1)
        nb = jnp.sum(b * b, axis=1)
        d = na[:, None] + nb[None, :] - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST)
        total = total + jnp.maximum(d, 0.0) / n
    return total


def perceptual_distance(fa: dict, fb: dict) -> jax.Array:
    """(B,) perceptual distances between matching rows of two feature batches."""
    return sum(jnp.mean((fa[t] - fb[t]) ** 2, axis=(1, 2, 3)) for t in fa)


def relational_distance(g_src: np.ndarray, g_tgt: np.ndarray) -> tuple[float, float]:
    """Eq. 19: ``min_gamma ||G_tgt - gamma G_src||_F^2 / n`` in closed form; returns (RD, gamma).

    The optimum of the quadratic in gamma is ``gamma* = <G_tgt, G_src> / <G_src, G_src>``
    (gamma = 0 when G_src is all zeros, e.g. n = 1)."""
    gs = np.asarray(g_src, np.float64)
    gt = np.asarray(g_tgt, np.float64)
    if gs.shape != gt.shape or gs.ndim != 2 or gs.shape[0] != gs.shape[1]:
        raise ValueError(f"G_src and G_tgt must be equal n x n matrices, got {gs.shape} and {gt.shape}")
    n = gs.shape[0]
    den = float(np.sum(gs * gs))
    gamma = float(np.sum(gt * gs)) / den if den > 0 else 0.0
    return float(np.sum((gt - gamma * gs) ** 2)) / max(n, 1), gamma


# --- loading -----------------------------------------------------------------------------------

def _trunk_state_dict(sd: dict) -> dict:
    """Keep ``features.N.*`` (strip ``module.`` / ``net.`` wrappers); drop classifier heads."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "net."):
            if k.startswith(p):
                k = k[len(p):]
        if k.startswith("features."):
            out[k] = v
    return out


def infer_config(sd: dict, arch: str) -> ConvNetConfig:
    """Widths from a torchvision ``features`` state dict (so tiny test networks load too)."""
    cfg = ConvNetConfig.default(arch)
    if arch == "squeezenet1_1":
        def width(key):
            if key not in sd:
                raise CheckpointError(f"not a torchvision squeezenet1_1 features state dict: missing '{key}' "
                                      f"(found e.g. {sorted(sd)[:4]})")
            return int(np.shape(sd[key])[0])

        fires = tuple(tuple(width(f"features.{i}.{p}.weight") for p in ("squeeze", "expand1x1", "expand3x3"))
                      for i in _FIRE_INDICES)
        return ConvNetConfig(arch, (width("features.0.weight"),) + fires)
    convs = [l for l in cfg.layers() if l[1] == "conv"]
    outs = []
    for l in convs:
        key = f"features.{l[0]}.weight"
        if key not in sd:
            raise CheckpointError(f"not a torchvision {arch} features state dict: missing '{key}' "
                                  f"(found e.g. {sorted(sd)[:4]})")
        outs.append(int(np.shape(sd[key])[0]))
    if arch == "vgg16":
        widths, i = [], 0
        for n in (2, 2, 3, 3, 3):
            widths.append(outs[i])
            i += n
        return ConvNetConfig(arch, tuple(widths))
    return ConvNetConfig(arch, tuple(outs))


def trunk_template(config: ConvNetConfig) -> dict:
    taps = config.taps()
    return jax.eval_shape(ConvFeatures(config, taps).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]


def heads_template(config: ConvNetConfig) -> dict:
    taps = LPIPS_LAYERS[config.arch]
    diffs = [jnp.zeros((1, 4, 4, config.channels(t))) for t in taps]
    return jax.eval_shape(LPIPSHeads(config).init, jax.random.PRNGKey(0), diffs)["params"]


def load_trunk(path: str, arch: str = "vgg16") -> tuple[ConvNetConfig, dict]:
    """A torchvision ``vgg16`` (``alexnet``, ``squeezenet1_1``) state dict file (.pth via torch, or .safetensors)."""
    sd = _trunk_state_dict(read_weights(path))
    if not sd:
        raise CheckpointError(f"{path}: no 'features.N.weight' tensors (expected a torchvision {arch} state dict)")
    config = infer_config(sd, arch)
    return config, state_dict_to_flax(sd, trunk_template(config), source=path)


def load_heads(path: str, config: ConvNetConfig) -> dict:
    """lpips linear heads (``lin0.model.1.weight`` ...; the lpips package's ``weights/v0.1/vgg.pth``,
    ``alex.pth``, ``squeeze.pth``)."""
    sd = {k: v for k, v in read_weights(path).items() if k.startswith("lin")}
    if not sd:
        raise CheckpointError(f"{path}: no 'lin0.model.1.weight' ... tensors (expected lpips {config.arch} weights)")
    return state_dict_to_flax(sd, heads_template(config), source=path)
