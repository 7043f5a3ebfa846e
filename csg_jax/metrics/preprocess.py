"""Image preprocessing of the metric networks, in JAX with explicit (out, in) resize matrices.

Two resamplers, both separable linear maps built with numpy at trace time:

* ``"antialias"`` (default) -- PIL's ``Image.resize`` (``ImagingResample``): the filter is
  stretched by the downscale factor (antialiasing), taps outside the image are dropped and the
  weights renormalised; bicubic uses a = -0.5. torch's ``F.interpolate(..., antialias=True)`` and
  torchvision's ``Resize(antialias=True)`` implement the same algorithm, so these matrices match
  PIL on float ("F") images and torch's antialiased kernels to float rounding (tests check
  both). transformers' ``CLIPImageProcessor`` resizes with PIL too, but on **8-bit** images: PIL
  rounds and clips to uint8 after each pass, which we do not (we clip to [0, 255] once, after
  both passes). The difference is at most ~1/255 per pixel before normalisation; on a tiny
  random CLIP it moves the image embedding by ~1e-3 relative (measured in
  tests/test_metrics.py), far below the differences between methods.
* ``"torch"`` -- ``torch.nn.functional.interpolate(..., antialias=False)`` (bicubic a = -0.75,
  border replication; :mod:`csg_jax.resize`), for pipelines that resize tensors without
  antialiasing. Downscaling 512 -> 224 this way aliases; it is not the default.

Images enter as (B, H, W, 3) floats in [0, 255] (uint8 values) and leave NHWC, normalised.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.resize import interpolation_matrix

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLERS = ("antialias", "torch")


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # PIL's (and torch antialias's) cubic constant
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}


@lru_cache(maxsize=256)
def _aa_matrix(in_size: int, out_size: int, filt: str) -> np.ndarray:
    fn, fsupport = _FILTERS[filt]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    m = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C truncation, as PIL
        xmax = min(int(center + support + 0.5), in_size)
        xs = np.arange(xmin, xmax)
        w = fn((xs - center + 0.5) / filterscale)
        total = w.sum()
        m[xx, xmin:xmax] = w / total if total != 0 else w
    return m


def resize_matrix(in_size: int, out_size: int, filt: str = "bicubic", resample: str = "antialias") -> np.ndarray:
    """(out, in) float64 matrix of a 1-D resize. filt: "bicubic" | "bilinear"; resample: see module doc."""
    if resample == "antialias":
        if filt not in _FILTERS:
            raise ValueError(f"unknown filter {filt!r}; expected one of {sorted(_FILTERS)}")
        return _aa_matrix(int(in_size), int(out_size), filt).copy()
    if resample == "torch":
        return interpolation_matrix(in_size, out_size, filt)
    raise ValueError(f"unknown resampler {resample!r}; expected one of {RESAMPLERS}")


def resize(images: jax.Array, hw: tuple[int, int], filt: str = "bicubic", resample: str = "antialias") -> jax.Array:
    """(B, H, W, C) -> (B, h, w, C) float32 (static sizes; jit-friendly). Identity sizes are skipped."""
    x = jnp.asarray(images, jnp.float32)
    H, W = x.shape[1:3]
    h, w = int(hw[0]), int(hw[1])
    hi = jax.lax.Precision.HIGHEST
    if h != H:
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(resize_matrix(H, h, filt, resample), jnp.float32), x, precision=hi)
    if w != W:
        x = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(resize_matrix(W, w, filt, resample), jnp.float32), x, precision=hi)
    return x


def shortest_side_size(hw: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``size`` (long side ``int(size * long / short)``, as
    transformers and torchvision compute it); torchvision's ``max_size`` caps the long side."""
    H, W = hw
    short, long = (W, H) if W <= H else (H, W)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if W <= H else (new_short, new_long)


def center_crop(images: jax.Array, size: int) -> jax.Array:
    """Centre crop (B, H, W, C) to (B, size, size, C): top = (H - size) // 2 (transformers' rule)."""
    H, W = images.shape[1:3]
    top, left = (H - size) // 2, (W - size) // 2
    return images[:, top:top + size, left:left + size]


def normalize(images01: jax.Array, mean, std) -> jax.Array:
    return (images01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def clip_preprocess(images: jax.Array, size: int = 224, resample: str = "antialias") -> jax.Array:
    """CLIPImageProcessor: short side -> ``size`` bicubic, centre crop, /255, CLIP mean/std.
    (B, H, W, 3) in [0, 255] -> (B, size, size, 3)."""
    x = resize(images, shortest_side_size(images.shape[1:3], size), "bicubic", resample)
    x = jnp.clip(x, 0.0, 255.0)  # PIL works in uint8: overshoots are clipped
    return normalize(center_crop(x, size) / 255.0, CLIP_MEAN, CLIP_STD)


def dino_preprocess(images: jax.Array, size: int = 224, max_size: int = 480, resample: str = "antialias",
                    scale: float = 1 / 255) -> jax.Array:
    """Splice's DINO input: ``Resize(size, max_size)`` (bilinear, aspect kept, no crop), times
    ``scale`` (1/255: [0, 1]), ImageNet mean/std. (B, H, W, 3) in [0, 255] -> (B, h, w, 3).
    PIE-Bench's evaluator feeds 0..255 values to the normalisation (``scale=1``) after a tensor
    ``Resize`` without antialiasing (``resample="torch"``)."""
    x = resize(images, shortest_side_size(images.shape[1:3], size, max_size), "bilinear", resample)
    return normalize(x * scale, IMAGENET_MEAN, IMAGENET_STD)
