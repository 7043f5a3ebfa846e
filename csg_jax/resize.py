"""PyTorch-compatible 2-D resizing with explicit interpolation matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` (cubic constant a = -0.5
instead of -0.75, antialiasing when downsampling), and the CSG masks are visibly sensitive to
that. Resizing is linear and separable, so we build, per axis, the (out, in) matrix that torch's
kernel implicitly applies and contract it with `jnp.einsum`. The matrices depend only on static
sizes: numpy builds them at trace time and they become constants of the jitted program (they are
tiny: e.g. 64 x 16).

Reproduced torch semantics (CPU kernels `upsample_bilinear2d` / `upsample_bicubic2d` /
`upsample_nearest2d` with an explicit output `size`, `align_corners=False`, no antialias):

* scale = in / out, computed in float32 like torch's `opmath_t` for float inputs;
* linear / cubic source coordinate: src = scale * (dst + 0.5) - 0.5 (linear clamps src < 0 to 0);
* bilinear: taps floor(src) and floor(src) + 1 (clamped to in - 1);
* bicubic: taps floor(src) - 1 .. floor(src) + 2, each index clamped into [0, in - 1] (border
  replication, weights of clamped taps add up), cubic convolution with a = -0.75;
* nearest (legacy torch "nearest", not "nearest-exact"): src = min(floor(dst * scale), in - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("bilinear", "bicubic", "nearest")
_CUBIC_A = -0.75  # torch's cubic convolution constant (jax.image uses -0.5)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src).

    t: (out,) fractional parts in [0, 1]. Returns (out, 4). Same formulas as torch's
    `get_cubic_upsample_coefficients`.
    """
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@lru_cache(maxsize=256)
def _matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)

    if mode == "nearest":
        src = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
        m[rows, src] = 1.0
        return m

    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)  # float32, like torch
    if mode == "bilinear":
        src = np.maximum(src, np.float32(0.0))
    # torch's guard_index_and_lambda: index <= in - 1, lambda clamped into [0, 1].
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src.astype(np.float64) - idx, 0.0, 1.0)

    if mode == "bilinear":
        idx1 = np.minimum(idx + 1, in_size - 1)
        np.add.at(m, (rows, idx), 1.0 - lam)
        np.add.at(m, (rows, idx1), lam)
        return m

    # bicubic: out-of-range taps read the border pixel, so their weights accumulate there.
    w = _cubic_weights(lam)
    for k in range(4):
        np.add.at(m, (rows, np.clip(idx - 1 + k, 0, in_size - 1)), w[:, k])
    return m


def interpolation_matrix(in_size: int, out_size: int, mode: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64 matrix M with `y = M @ x` equal to torch's 1-D resize.

    mode: "bilinear", "bicubic" or "nearest" (torch semantics, align_corners=False, no
    antialias; see the module docstring). Rows sum to 1. The returned array is a fresh copy.
    """
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {MODES}")
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    return _matrix(in_size, out_size, mode).copy()


def resize_2d(
    x: jax.Array,
    size: Sequence[int],
    mode: str = "bicubic",
    axes: Sequence[int] = (-2, -1),
) -> jax.Array:
    """Resize two spatial axes of `x` like `torch.nn.functional.interpolate(..., size, mode,
    align_corners=False)`.

    x: array of any rank >= 2; `axes` = (height axis, width axis), e.g. (1, 2) for NHWC or
    (-2, -1) for (..., H, W). size: (out_h, out_w), static ints. Returns x with those two axes
    resized, other axes untouched; dtype is x's (integer inputs become float32).
    Works under `jit` (sizes come from static shapes).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    ax_h, ax_w = (int(a) % x.ndim for a in axes)
    if ax_h == ax_w:
        raise ValueError(f"axes must be two different axes, got {tuple(axes)}")
    out_h, out_w = (int(s) for s in size)
    # Contract in float32 at least, and with full precision: on GPUs the default matmul
    # precision for fp32 can be TF32, which would cost ~1e-3 relative error.
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    mh = jnp.asarray(interpolation_matrix(x.shape[ax_h], out_h, mode), dtype=cdt)
    mw = jnp.asarray(interpolation_matrix(x.shape[ax_w], out_w, mode), dtype=cdt)
    y = jnp.moveaxis(x.astype(cdt), (ax_h, ax_w), (-2, -1))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hw->...ow", mh, y, precision=hi)
    y = jnp.einsum("pw,...ow->...op", mw, y, precision=hi)
    return jnp.moveaxis(y, (-2, -1), (ax_h, ax_w)).astype(x.dtype)
