"""Does a word's cross-attention land on its object? The localisation ratio of the shapes model.

For held-out *real* images (ground-truth masks known), each image is noised to one timestep
``t`` with fixed noise and passed once through the UNet with its caption (conditional branch,
no guidance). Every cross-attention layer records the head-mean probability of the word's
token at each query pixel. Per layer and image::

    ratio = (attention mass inside the mask / total attention mass) / (mask area / image area)

with the mask average-pooled to the layer's resolution (fractional coverage). 1 means no
localisation; the issue's bar is >= 2. Real images rather than samples: the mask is exact, and
the measurement does not depend on whether sampling drew the right shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.models.attention import AttentionControl
from csg_jax.models.unet import attention_layers
from csg_jax.schedule import alpha_at, make_schedule


def cross_layers(pipe, latent_hw: tuple[int, int]) -> list:
    """:class:`LayerInfo` of every cross-attention layer, in call order."""
    return [l for l in attention_layers(pipe.unet.config, latent_hw) if l.kind == "cross"]


@functools.lru_cache(maxsize=4)
def _probe(pipe, latent_hw: tuple[int, int]):
    """jit (params, x0, context, columns (B, 1), noise, t) -> {layer: (B, Q, 1)} word attention."""
    record = tuple((l.name, "token_mean") for l in cross_layers(pipe, latent_hw))
    schedule = make_schedule(pipe.scheduler_config, 1)

    @jax.jit
    def run(params, x0, context, columns, noise, t):
        a = alpha_at(schedule, t)
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise  # forward process q(x_t | x_0)
        control = AttentionControl(record=record, token_columns=columns)
        _, records = pipe.unet.apply({"params": params["unet"]}, x_t, t, context, control)
        return records

    return run


def pooled_mask(masks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """bool (B, H, W) -> float (B, h, w) fraction of each cell covered (H, W multiples of h, w)."""
    b, H, W = masks.shape
    h, w = hw
    return masks.reshape(b, h, H // h, w, W // w).mean(axis=(2, 4)).astype(np.float32)


def word_localisation(pipe, images: np.ndarray, masks: np.ndarray, captions: list[str], word_positions: np.ndarray,
                      t: int = 500, seed: int = 0, batch_size: int = 64) -> dict:
    """Localisation ratios of one word per image.

    images: uint8 (B, H, W, 3); masks: bool (B, H, W); word_positions: int (B,) token column of
    the word in each caption (BOS = 0). Returns ``ratio`` (mean over layers and images),
    ``per_layer`` {name: mean ratio}, ``per_image`` (B,) (mean over layers), and ``t``.
    """
    b = images.shape[0]
    x = images.astype(np.float32) / 127.5 - 1.0
    latent_hw = (x.shape[1] // pipe.downsample, x.shape[2] // pipe.downsample)
    layers = cross_layers(pipe, latent_hw)
    run = _probe(pipe, latent_hw)
    area = masks.reshape(b, -1).mean(axis=1)
    ratios = {l.name: [] for l in layers}
    for i in range(0, b, batch_size):
        sl = slice(i, i + batch_size)
        x0 = pipe.encode(pipe.params, jnp.asarray(x[sl]))
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x0.shape, x0.dtype)
        context = pipe.embed(list(captions[sl]))
        cols = jnp.asarray(np.asarray(word_positions[sl], np.int32)[:, None])
        records = jax.device_get(run(pipe.params, x0, context, cols, noise, jnp.int32(t)))
        for l in layers:
            attn = np.asarray(records[l.name], np.float32)[..., 0].reshape(-1, *l.resolution)
            inside = pooled_mask(masks[sl], l.resolution)
            share = (attn * inside).sum(axis=(1, 2)) / np.maximum(attn.sum(axis=(1, 2)), 1e-12)
            ratios[l.name].append(share / np.maximum(area[sl], 1e-6))
    per_layer = {k: np.concatenate(v) for k, v in ratios.items()}
    per_image = np.mean(np.stack(list(per_layer.values())), axis=0)
    return {"ratio": float(per_image.mean()), "per_layer": {k: float(v.mean()) for k, v in per_layer.items()},
            "per_image": per_image, "t": int(t)}
