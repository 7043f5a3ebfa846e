"""2-D convolution with Flax ``nn.Conv``'s parameters, lowered per platform.

XLA's CPU convolution is slow where feature maps are small and channels many: SD-1.5's UNet at
256 px spends ~60% of an evaluation in its 16x16, 8x8 and 4x4 convolutions (640-2560 input
channels) at 30-70 GFLOP/s, while one matrix product over the 3x3 patches (im2col) of the same
layer runs at 90-160 GFLOP/s (2-5x faster; 2-core Zen 4, float32, batch 1). On large maps XLA's
own convolution is the faster one (32x32x960: 149 vs 69 GFLOP/s). So, on the CPU only:

* 1x1 kernels are a plain matrix product;
* other kernels with at most :data:`IM2COL_MAX_PIXELS` output pixels (batch x height x width) are
  im2col + one matrix product;
* the rest keeps XLA's convolution.

GPU and TPU programs always use XLA's convolution (:func:`cpu_lowering`; deviceless compiles for
an accelerator set ``CSG_JAX_CONV=xla``). The results differ from XLA's
convolution by float32 rounding of the reordered sums only (~1e-6 relative).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from csg_jax.models.precision import is_half

IM2COL_MAX_PIXELS = 512  # output pixels (B * Ho * Wo) up to which im2col beats XLA's CPU convolution

Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=_accumulator(x.dtype)).astype(x.dtype)


def _accumulator(dtype):
    return jnp.float32 if is_half(dtype) else None  # half precision sums in float32 (models/precision.py)


def _patches_conv(x, kernel, strides, padding):
    """im2col: the kh*kw shifted (strided) views side by side on the channel axis, one dot."""
    kh, kw, cin, cout = kernel.shape
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    b, h, w, _ = x.shape
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    views = [xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] for i in range(kh) for j in range(kw)]
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)  # (B, Ho, Wo, kh*kw*Cin)
    out = jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(kh * kw * cin, cout), preferred_element_type=_accumulator(x.dtype))
    return out.astype(x.dtype)


def _cpu_conv(x, kernel, strides, padding):
    kh, kw = kernel.shape[:2]
    b, h, w, _ = x.shape
    (pt, pb), (pl, pr) = padding
    pixels = b * ((h + pt + pb - kh) // strides[0] + 1) * ((w + pl + pr - kw) // strides[1] + 1)
    if (kh, kw) == (1, 1) or pixels <= IM2COL_MAX_PIXELS:
        return _patches_conv(x, kernel, strides, padding)
    return _xla_conv(x, kernel, strides, padding)


def cpu_lowering() -> bool:
    """Whether convolutions take the CPU lowering: tracing for the CPU backend, unless
    ``CSG_JAX_CONV=xla`` (set by :func:`csg_jax.aot.deviceless_environment`, whose host traces for
    an accelerator). Decided at trace time rather than with ``lax.platform_dependent``: a
    platform switch would make gradients keep the residuals of both lowerings."""
    return os.environ.get("CSG_JAX_CONV", "auto") != "xla" and jax.default_backend() == "cpu"


def conv2d(x, kernel, strides=(1, 1), padding: Padding = ((0, 0), (0, 0))):
    """NHWC x (B, H, W, Cin), HWIO kernel (kh, kw, Cin, Cout), explicit padding -> (B, Ho, Wo, Cout)."""
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    return (_cpu_conv if cpu_lowering() else _xla_conv)(x, kernel, strides, padding)


class Conv(nn.Module):
    """Drop-in for ``nn.Conv`` as the models use it (params ``kernel`` (kh, kw, Cin, Cout) and
    ``bias`` (Cout,), the same initialisers); ``padding``: explicit pairs or ``"VALID"``."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        padding = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype).astype(self.dtype)
        return y
