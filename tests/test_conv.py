"""csg_jax.models.conv: the CPU lowering (im2col / dot / XLA convolution by size) against XLA's
convolution, and the parameters against flax's nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.models import conv as C


def _xla(x, k, strides, padding):
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((1, 8, 8, 16), (3, 3), (1, 1), ((1, 1), (1, 1))),      # im2col (64 output pixels)
    ((2, 9, 7, 8), (3, 3), (2, 2), ((0, 1), (0, 1))),       # strided, asymmetric padding (VAE downsample)
    ((1, 6, 6, 12), (1, 1), (1, 1), ((0, 0), (0, 0))),      # 1x1: a dot
    ((1, 32, 32, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),     # 1024 pixels: XLA's own convolution
])
def test_cpu_lowering_equals_xla_convolution(shape, kernel, strides, padding):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(*shape), jnp.float32)
    k = jnp.asarray(rs.randn(*kernel, shape[-1], 5), jnp.float32)
    want = np.asarray(_xla(x, k, strides, padding))
    got = np.asarray(jax.jit(lambda x, k: C.conv2d(x, k, strides, padding))(x, k))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    patches = np.asarray(C._patches_conv(x, k, strides, padding))  # the im2col path itself, whatever the size
    np.testing.assert_allclose(patches, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_params_are_nn_convs():
    x = jnp.ones((1, 6, 6, 3))
    ours = C.Conv(4, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(1), x)
    theirs = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)
    y_ours = C.Conv(4, (3, 3), padding=((1, 1), (1, 1))).apply(theirs, x)
    y_theirs = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1))).apply(theirs, x)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
