"""Prompt-to-Prompt word swap (Hertz et al., ICLR 2023) in the CSG engine.

Source and target branches are denoised together from the same inverted latent, one batched
UNet call per step with rows ``[source | negative, target | negative, source | source prompt,
target | target prompt]`` (each block B images). Everything P2P does to attention happens inside
that call through :class:`AttentionControl` ``mix`` with the *source-conditional rows of the same
call* as reference (``mix_ref_rows``), so no map is stored or recomputed:

* **cross-attention replacement**, steps i < int(cross_replace_steps (N + 1)) (P2P's alpha
  schedule has N + 1 entries): the target-conditional rows use the source-conditional rows'
  probabilities (weight 0), column j taken from the source column ``prompts.ref_columns[j]``
  (the editor's token matching; the swapped word reads the map of the word it replaces) and
  multiplied by the equalizer (``equalizer_scale`` on ``prompts.reweight_columns``, 1 elsewhere);
* **self-attention replacement**, steps i < int(self_replace_steps N), in the layers with
  H W <= (latent / 4)^2 (P2P: <= 16^2 at 64x64 latents);
* later steps: weight 1, the target's own attention (mix is then the identity);
* the negative rows are never touched (P2P edits the conditional half only);
* **LocalBlend** (``local_blend``): running sums over steps of the source word's map (source
  rows) and the target words' map (target rows, their own softmax before replacement:
  ``record_live``) in the cross layers at 16x16-equivalent resolution (latent / 4; P2P: the
  16x16 down and up layers), 3x3 max-pooled, resized (nearest) to the latent, divided by their
  max and thresholded at ``blend_threshold``; the union is the mask, and from step
  int(blend_start N) on the target latent after each step is x_src + mask (x_tgt - x_src).

Switching per step is done with 0/1 weight *arrays* chosen inside one compiled ``lax.scan``.
Outputs: the source branch's final latent (P2P's reconstruction), the edit, ``mask_raw`` = the
source word's cross-attention mask (CSG's per-step mask, averaged over steps, clamped) and
``mask`` = the LocalBlend mask (or ``mask_raw`` without blending).

P2P's own defaults are guidance 7.5 with the empty negative prompt
(``EditConfig.for_method("p2p")``); the CSG paper compares at guidance 5 with the source prompt
as negative (``EditConfig(method="p2p")``). UNet cost: 4 image-evaluations per step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from csg_jax.editing import csg
from csg_jax.editing.config import EditConfig
from csg_jax.models.attention import AttentionControl
from csg_jax.models.unet import LayerInfo, attention_layers
from csg_jax.resize import resize_2d
from csg_jax.schedule import DDIMSchedule, ddim_transfer, sampling_plan


class Knobs(NamedTuple):
    """P2P's settings as arrays (sweeping them does not recompile). Step counts follow P2P's
    rounding of the fractions (host-side Python ints, so 0.7 x 10 is 7, not 6)."""

    cross_steps: jax.Array  # () int32, steps i < cross_steps replace cross-attention
    self_steps: jax.Array  # () int32, steps i < self_steps replace coarse self-attention
    blend_start: jax.Array  # () int32, LocalBlend acts at steps i >= blend_start
    blend_threshold: jax.Array  # () float32
    equalizer_scale: jax.Array  # () float32

    @classmethod
    def from_config(cls, config: EditConfig) -> "Knobs":
        n = config.num_steps
        i = lambda v: jnp.asarray(int(v), jnp.int32)
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(i(config.cross_replace_steps * (n + 1)), i(config.self_replace_steps * n), i(config.blend_start * n),
                   f(config.blend_threshold), f(config.equalizer_scale))


class Layers(NamedTuple):
    cross: tuple[LayerInfo, ...]  # every cross-attention layer (replaced)
    self_replaced: tuple[LayerInfo, ...]  # self-attention layers with H W <= (latent / 4)^2
    blend: tuple[LayerInfo, ...]  # cross layers at 16x16-equivalent resolution (LocalBlend maps)
    mask: csg.LayerPlan  # layers of the source-word mask (mask_raw)


def plan_layers(unet_config, latent_hw: tuple[int, int], mask_plan: csg.LayerPlan) -> Layers:
    layers = attention_layers(unet_config, latent_hw)
    cross = tuple(l for l in layers if l.kind == "cross")
    coarse = max(1, latent_hw[0] // 4) * max(1, latent_hw[1] // 4)
    self_replaced = tuple(l for l in layers if l.kind == "self" and l.resolution[0] * l.resolution[1] <= coarse)
    area = lambda l: l.resolution[0] * l.resolution[1]
    best = min({area(l) for l in cross}, key=lambda a: (abs(a - coarse), a))
    blend = tuple(l for l in cross if area(l) == best)
    return Layers(cross, self_replaced, blend, mask_plan)


def blend_mask(word_maps: jax.Array, latent_hw, threshold) -> jax.Array:
    """LocalBlend mask (B, h, w) in {0, 1} from (B, 2, r, r) source / target word maps: 3x3 max
    pooling (stride 1), nearest resize to the latent, division by the max, threshold, union."""
    pooled = jax.lax.reduce_window(word_maps, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 1, 1),
                                   ((0, 0), (0, 0), (1, 1), (1, 1)))
    m = resize_2d(pooled, tuple(latent_hw), "nearest")
    m = m / jnp.max(m, axis=(2, 3), keepdims=True)
    return jnp.any(m > threshold, axis=1).astype(jnp.float32)


def edit(pipe, params, x_T, prompts: csg.Prompts, schedule: DDIMSchedule, layers: Layers, config: EditConfig,
         knobs: csg.Knobs, p2p_knobs: Knobs, uncond: Optional[jax.Array] = None) -> dict:
    """P2P word swap from x_T (B, h, w, C). ``uncond`` (N, B, 77, D): per-step negative contexts
    (null-text inversion) for both branches instead of ``prompts.negative``.

    Returns {"reconstruction", "edited"} latents (B, h, w, C) and {"mask_raw", "mask"} (B, h, w).
    """
    b, h, w, _ = x_T.shape
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    n = timesteps.shape[0]
    g = csg.per_image(knobs.guidance_scale)
    tokens = prompts.ref_columns.shape[1]
    rows = jnp.arange(b)
    identity = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (b, tokens))
    ones = jnp.ones((b, tokens), jnp.float32)
    # the source word as full-width column weights (B, 77); the target words likewise
    src_w = jnp.zeros((b, tokens), jnp.float32).at[rows[:, None], prompts.source_columns].add(prompts.source_weights)
    tgt_w = src_w if prompts.target_weights is None else prompts.target_weights.astype(jnp.float32)  # word swap
    reweight = prompts.reweight_columns if prompts.reweight_columns is not None else jnp.zeros((b, tokens))
    equalizer = 1.0 + reweight * (p2p_knobs.equalizer_scale - 1.0)  # (B, 77)

    # rows: [src|neg, tgt|neg, src|source, tgt|target]; only the last block is edited
    ref_rows = jnp.concatenate([rows, b + rows, 2 * b + rows, 2 * b + rows])
    ref_columns = jnp.concatenate([identity, identity, identity, prompts.ref_columns.astype(jnp.int32)])
    ref_scale = jnp.concatenate([ones, ones, ones, equalizer])
    names = dict.fromkeys(l.name for l in layers.mask.mask_layers + layers.blend)  # coarse layers: (4B, Q, 77) is small
    record = tuple((name, "head_mean") for name in names)
    edited_row = (jnp.arange(4 * b) >= 3 * b)[:, None]  # (4B, 1)
    blend_hw = layers.blend[0].resolution
    ctx_cond = jnp.concatenate([prompts.source, prompts.target])
    mask_prompts = prompts._replace(source_weights=src_w)

    def weights(active, layer):  # (4B, Q): 0 (use the source's maps) on edited rows while active
        q = layer.resolution[0] * layer.resolution[1]
        return jnp.broadcast_to(jnp.where(edited_row & active, 0.0, 1.0), (4 * b, q))

    def step(carry, xs):
        x_src, x_tgt, word_sum, mask_sum = carry
        i, t, a_t, a_prev, *negative = xs
        negative = negative[0] if negative else prompts.negative
        mix = {l.name: weights(i < p2p_knobs.cross_steps, l) for l in layers.cross}
        mix.update({l.name: weights(i < p2p_knobs.self_steps, l) for l in layers.self_replaced})
        control = AttentionControl(record=record, mix=mix, mix_ref_rows=ref_rows, mix_ref_columns=ref_columns,
                                   mix_ref_scale=ref_scale, record_live=True)
        x4 = jnp.concatenate([x_src, x_tgt, x_src, x_tgt])
        out, rec = pipe.unet.apply({"params": params["unet"]}, x4, t,
                                   jnp.concatenate([negative, negative, ctx_cond]), control)
        out = out.astype(jnp.float32)
        u_src, u_tgt, c_src, c_tgt = jnp.split(out, 4)
        x_src_next = ddim_transfer(u_src + g * (c_src - u_src), x_src, a_t, a_prev, schedule.prediction_type)
        x_tgt_next = ddim_transfer(u_tgt + g * (c_tgt - u_tgt), x_tgt, a_t, a_prev, schedule.prediction_type)

        maps = []
        for layer in layers.blend:  # source word on source rows, target words on target rows
            r = rec[layer.name].astype(jnp.float32)
            src = jnp.einsum("bqt,bt->bq", r[2 * b : 3 * b], src_w)
            tgt = jnp.einsum("bqt,bt->bq", r[3 * b :], tgt_w)
            maps.append(jnp.stack([src, tgt], axis=1).reshape(b, 2, *blend_hw))
        word_sum = word_sum + jnp.mean(jnp.stack(maps), axis=0)
        if config.local_blend:
            m = blend_mask(word_sum, (h, w), p2p_knobs.blend_threshold)[..., None]
            blended = x_src_next + m * (x_tgt_next - x_src_next)
            x_tgt_next = jnp.where(i >= p2p_knobs.blend_start, blended, x_tgt_next)

        src_rec = {l.name: rec[l.name][2 * b : 3 * b].astype(jnp.float32) for l in layers.mask.mask_layers}
        mask_sum = mask_sum + csg.step_mask(src_rec, mask_prompts, layers.mask, (h, w))
        return (x_src_next, x_tgt_next, word_sum, mask_sum), None

    x = x_T.astype(jnp.float32)
    init = (x, x, jnp.zeros((b, 2, *blend_hw), jnp.float32), jnp.zeros((b, h, w), jnp.float32))
    xs = (jnp.arange(n), timesteps, alpha_t, alpha_prev) + (() if uncond is None else (uncond,))
    (x_src, x_tgt, word_sum, mask_sum), _ = jax.lax.scan(step, init, xs)
    mask_raw = jnp.clip(mask_sum / n, 0.0, 1.0)
    mask = blend_mask(word_sum, (h, w), p2p_knobs.blend_threshold) if config.local_blend else mask_raw
    return {"reconstruction": x_src, "edited": x_tgt, "mask_raw": mask_raw, "mask": mask}
