"""csg_jax.resize against torch.nn.functional.interpolate (align_corners=False)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csg_jax.resize import interpolation_matrix, resize_2d

torch.set_num_threads(1)

SIZES = [
    # upsampling
    ((4, 4), (16, 16)),
    ((8, 8), (16, 16)),
    ((16, 16), (64, 64)),
    ((2, 2), (16, 16)),
    # downsampling
    ((64, 64), (16, 16)),
    ((16, 16), (8, 8)),
    ((32, 32), (4, 4)),
    # non-square, mixed up/down, non-integer ratios
    ((8, 12), (16, 6)),
    ((5, 7), (13, 3)),
    ((16, 16), (16, 16)),
]


def _torch_resize(x_nchw: np.ndarray, size, mode) -> np.ndarray:
    with torch.no_grad():
        y = torch.nn.functional.interpolate(
            torch.from_numpy(x_nchw), size=size, mode=mode,
            **({} if mode == "nearest" else {"align_corners": False}),
        )
    return y.numpy()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_matches_torch_nchw(mode, in_hw, out_hw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *in_hw)).astype(np.float32)
    ref = _torch_resize(x, out_hw, mode)
    got = np.asarray(resize_2d(jnp.asarray(x), out_hw, mode))  # axes (-2, -1)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= 1e-5, f"{mode} {in_hw}->{out_hw}: max abs err {err:.2e}"


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_nhwc_axes_and_jit(mode):
    """NHWC layout (axes 1, 2) under jit equals the NCHW torch result transposed."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 16, 16)).astype(np.float32)  # NCHW for torch
    ref = _torch_resize(x, (64, 64), mode).transpose(0, 2, 3, 1)
    f = jax.jit(lambda a: resize_2d(a, (64, 64), mode, axes=(1, 2)))
    got = np.asarray(f(jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert np.abs(got - ref).max() <= 1e-5


def test_rank_two_and_matrix_properties():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 8)).astype(np.float32)
    ref = _torch_resize(x[None, None], (16, 16), "bicubic")[0, 0]
    assert np.abs(np.asarray(resize_2d(x, (16, 16), "bicubic")) - ref).max() <= 1e-5
    for mode in ("bilinear", "bicubic", "nearest"):
        m = interpolation_matrix(7, 19, mode)
        assert m.shape == (19, 7)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    # bicubic upsampling overshoots (negative lobes): the mask pipeline relies on torch doing so.
    assert interpolation_matrix(4, 16, "bicubic").min() < 0


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown resize mode"):
        interpolation_matrix(4, 8, "area")
