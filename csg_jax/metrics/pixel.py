"""PIE-Bench's pixel metrics: MSE, PSNR and SSIM (the torchmetrics formulas its evaluator calls).

Images are floats in [0, ``data_range``] (PIE-Bench: uint8 / 255, data range 1), (B, H, W, C),
each image reduced over all its pixels and channels:

* MSE = mean((a - b)^2) (torchmetrics ``MeanSquaredError`` over one image);
* PSNR = 10 log10(data_range^2 / MSE); +inf for identical images, as torchmetrics gives
  (``log(0) = -inf``) -- PIE-Bench's table averages these values as they are;
* SSIM (torchmetrics ``StructuralSimilarityIndexMeasure(data_range=1.0)`` defaults): an 11 x 11
  Gaussian window, sigma 1.5 (weights ``exp(-d^2 / (2 sigma^2))``, d = -5 .. 5, normalised), per
  channel; local means / variances / covariance with the window, the variances clamped at 0,
  ``((2 mu_a mu_b + C1)(2 s_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(s_a + s_b + C2))`` with
  C1 = (0.01 L)^2, C2 = (0.03 L)^2, then the mean over the *valid* window positions
  ((H - 10) x (W - 10) per channel). torchmetrics reflect-pads by 5 and crops 5 from each side of
  the SSIM map afterwards, which keeps exactly these positions, so the padding never enters.

PIE-Bench evaluates the *unedited part*: both images multiplied by ``keep`` = 1 - edit mask
before any of these, so the masked-out pixels are 0 in both (and still count in the means).
:class:`PixelScorer` does that on uint8 batches, jitted once per image size.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size,) float32 normalised 1-D Gaussian, centred (torchmetrics' ``_gaussian``)."""
    d = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    g = np.exp(-((d / np.float32(sigma)) ** 2) / 2.0).astype(np.float32)
    return g / g.sum()


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, H, W, C) x2 -> (B,) mean squared error."""
    return jnp.mean((a - b) ** 2, axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
    """(B, H, W, C) x2 -> (B,) PSNR in dB; +inf where the images are equal."""
    m = mse(a, b)
    return jnp.where(m > 0, 10.0 * jnp.log10(data_range ** 2 / jnp.where(m > 0, m, 1.0)), jnp.inf)


def _filter_valid(x: jax.Array, g: np.ndarray) -> jax.Array:
    """Separable valid correlation with the 1-D window ``g`` over H then W: (B, H, W, C) ->
    (B, H - k + 1, W - k + 1, C). Shifted slices: k multiply-adds, no im2col."""
    k = len(g)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    y = sum(float(g[i]) * x[:, i:i + h] for i in range(k))
    return sum(float(g[i]) * y[:, :, i:i + w] for i in range(k))


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, size: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> jax.Array:
    """(B, H, W, C) x2 (H, W >= size) -> (B,) mean SSIM (see the module docstring)."""
    if min(a.shape[1:3]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size}, got {a.shape[1:3]}")
    g = gaussian_window(size, sigma)
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = jnp.maximum(_filter_valid(a * a, g) - mu_a ** 2, 0.0)
    var_b = jnp.maximum(_filter_valid(b * b, g) - mu_b ** 2, 0.0)
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def _scores(a_u8, b_u8, keep):
    k = keep.astype(jnp.float32)[..., None]
    a, b = a_u8.astype(jnp.float32) / 255.0 * k, b_u8.astype(jnp.float32) / 255.0 * k
    # the difference from the integers: XLA may round a and b through differently fused ops, and
    # identical images must give MSE 0 (PSNR inf) exactly
    d = (a_u8.astype(jnp.int32) - b_u8.astype(jnp.int32)).astype(jnp.float32) / 255.0 * k
    m = jnp.mean(d * d, axis=(1, 2, 3))
    p = jnp.where(m > 0, 10.0 * jnp.log10(1.0 / jnp.where(m > 0, m, 1.0)), jnp.inf)
    return jnp.stack([p, m, ssim(a, b)], axis=-1)


_scores_jit = jax.jit(_scores)


class PixelScorer:
    """PSNR / MSE / SSIM of uint8 image pairs on the kept pixels (no weights needed)."""

    def __init__(self, batch_size: int = 8):
        self.batch_size = batch_size

    def __call__(self, a: np.ndarray, b: np.ndarray, keep: Optional[np.ndarray] = None, progress=None) -> dict:
        """a, b: (B, H, W, 3) uint8; keep: (B, H, W) bool (None: every pixel). Returns
        {"psnr", "mse", "ssim"}: (B,) float arrays."""
        from csg_jax.metrics.scores import run_batched

        if keep is None:
            keep = np.ones(a.shape[:3], bool)
        out = run_batched(_scores_jit, [a, b, keep], self.batch_size, progress)
        return {"psnr": out[:, 0], "mse": out[:, 1], "ssim": out[:, 2]}
