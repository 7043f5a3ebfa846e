"""Direct Inversion (Ju et al., ICLR 2024: PnP Inversion) as an inversion kind for every method.

Expected values are closed forms: with a UNet that predicts zero noise, DDIM inversion scales x_0
by sqrt(alpha_t / alpha_0) per level, so the source branch's targets in sampling order are known
exactly; with any UNet, a source branch that follows the inversion ends at x_0 (the encoded image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csg_jax.editing import core
from csg_jax.editing.config import EditConfig
from csg_jax.editing.editor import get_editor, plan_prompts, prepare_prompts
from csg_jax.errors import ImageError
from csg_jax.schedule import make_schedule, sampling_plan


class _ZeroUNet:
    """Predicts zero noise: a DDIM step then only rescales the latent by sqrt(alpha_to / alpha_from)."""

    def apply(self, variables, x, t, ctx, control=None):
        return jnp.zeros_like(x), {}


class _ZeroPipe:
    unet = _ZeroUNet()


def test_source_path_is_the_inversion_in_sampling_order(tiny_sd1):
    schedule = make_schedule(tiny_sd1.scheduler_config, 5)
    x0 = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    x_T, trajectory = core.ddim_inversion(_ZeroPipe(), {"unet": None}, x0, None, schedule, trajectory=True)
    path = core.source_path(trajectory)
    _, alpha_t, alpha_prev = (np.asarray(a, np.float64) for a in sampling_plan(schedule))
    a0 = alpha_prev[-1]  # the clean level (final_alpha_cumprod)
    np.testing.assert_allclose(np.asarray(x_T), np.sqrt(alpha_t[0] / a0) * np.asarray(x0), rtol=1e-5)
    for i in range(5):  # after sampling step i the source branch sits at alpha_prev[i]
        np.testing.assert_allclose(np.asarray(path[i]), np.sqrt(alpha_prev[i] / a0) * np.asarray(x0), rtol=1e-5,
                                   atol=1e-6)


def test_follow_puts_the_branch_on_the_target():
    x = jnp.arange(6.0).reshape(1, 6)
    z = -jnp.ones((1, 6)) * 0.5
    np.testing.assert_allclose(np.asarray(core.follow(x, z)), np.asarray(z), atol=1e-6)
    assert core.follow(x, None) is x


@pytest.fixture(scope="module")
def image():
    return jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3), minval=-1, maxval=1)


def _run(pipe, image, method, inversion):
    config = EditConfig.for_method(method).replace(num_steps=3, inversion=inversion)
    plan = plan_prompts(pipe, "a photo of a cat", "cat2dog", None, None, config.negative_prompt)
    editor = get_editor(pipe, config, (16, 16))
    return editor, config, editor.run(image, prepare_prompts(pipe, [plan], config), config)


@pytest.mark.parametrize("method", ["csg-no-mixup", "p2p"])
def test_direct_inversion_source_branch_ends_at_the_image(pipe, image, method):
    """Random weights: a plain DDIM reconstruction drifts far from x_0 (by > 1 here); the followed
    branch ends on it. (csg-no-mixup has CSG's source pass; pix2pix-zero shares it too, and every
    method runs with Direct Inversion in the shapes PIE-Bench smoke test.)"""
    editor, config, direct = _run(pipe, image, method, "direct")
    x0 = editor.encode(image)
    err = np.abs(np.asarray(direct["reconstruction"]) - np.asarray(x0)).max()
    assert err < 1e-5, err
    plan = plan_prompts(pipe, "a photo of a cat", "cat2dog", None, None, config.negative_prompt)
    prompts = prepare_prompts(pipe, [plan], config)
    x_T, path = editor.invert_direct(x0, prompts.source)
    np.testing.assert_array_equal(np.asarray(direct["inverted"]), np.asarray(x_T))
    np.testing.assert_allclose(np.asarray(path[-1]), np.asarray(x0), atol=1e-6)  # the last target is x_0
    assert editor.trace_counts["invert_direct"] == 1 and editor.trace_counts["invert"] == 0
    with pytest.raises(ImageError, match="whole inversion trajectory"):
        editor.run(None, prompts, config, x_T=direct["inverted"])
