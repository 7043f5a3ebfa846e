"""Editing a generated image (the official ``src/edit_synthetic_images.py``; paper Fig. 6, 12-14).

No inversion: x_T is drawn from a seed, the source branch *samples* the source image from it on
the source prompt, and the method edits from the same x_T. As the official script, both branches
use classifier-free guidance with the empty negative prompt (its ``negative_prompt=""`` at
``guidance_scale``), which is every method's per-step ``uncond`` input here (the same (N, B, 77, D)
slot null-text inversion fills), so the source pass is guided (2 UNet evaluations per step).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.editing.config import EditConfig
from csg_jax.errors import ConfigError


def initial_noise(seed: int, latent_hw: tuple[int, int], channels: int) -> jax.Array:
    """x_T ~ N(0, I), (1, h, w, C), from ``jax.random.PRNGKey(seed)`` (not torch's generator: the
    same seed draws another image than the official script)."""
    return jax.random.normal(jax.random.PRNGKey(int(seed)), (1, *latent_hw, channels), jnp.float32)


def empty_uncond(prompts, num_steps: int) -> jax.Array:
    """The negative context of every step, (N, B, 77, D): ``prompts.negative`` (the empty prompt)."""
    return jnp.broadcast_to(prompts.negative[None], (num_steps, *prompts.negative.shape))


# The official script's settings: negative_prompt="" always; its posterior_guidance default 0.1 (the
# real-image default 10 overshoots here: the target branch is not held near the source by a source
# negative prompt, and lambda gamma_t > 1 at few steps).
DEFAULTS = {"negative_prompt": "empty", "posterior_guidance": 0.1}


def generation_config(config: EditConfig, given: tuple = ()) -> EditConfig:
    """``config`` as a generated image is edited: :data:`DEFAULTS` for the settings not in
    ``given`` (the negative prompt always); ConfigError for inversion kinds that need an image."""
    if config.inversion in ("null-text", "direct"):
        raise ConfigError(f"--generate samples the source from x_T: there is no inversion to make "
                          f"{config.inversion!r}; drop --inversion-variant {config.inversion}")
    return config.replace(**{k: v for k, v in DEFAULTS.items() if k == "negative_prompt" or k not in given})


def edit_generated(pipe, prompt: str, task: Optional[str] = None, target_prompt: Optional[str] = None,
                   config: EditConfig = EditConfig(), seed: int = 0, size: Optional[int] = None,
                   source_word: Optional[str] = None):
    """Sample a source image from ``seed`` on ``prompt`` and edit it: an :class:`EditResult` whose
    ``source_image`` is the sample (= its ``reconstruction``) and ``inverted`` the x_T drawn.
    ``config``: as :func:`generation_config` makes it."""
    from csg_jax.editing.editor import translate_image

    side = (size or pipe.unet.config.sample_size * pipe.downsample) // pipe.downsample
    x_T = initial_noise(seed, (side, side), pipe.unet.config.in_channels)
    result = translate_image(pipe, None, prompt, task, target_prompt, config, inverted=np.asarray(x_T[0]),
                             source_word=source_word, uncond_fn=lambda prompts: empty_uncond(prompts, config.num_steps))
    result.source_image = result.reconstruction
    return result
