"""Conditional Score Guidance (Algorithm 1) as pure, jit-compiled JAX, with its ablations.

After DDIM inversion (:func:`core.ddim_inversion`) and the source pass (:func:`core.source_pass`:
x_t^src per step, the mask M-hat of Eq. 11), :func:`target_pass` denoises x_T toward the target
prompt with

1. **cross-attention mixup** (Eq. 13, ``mixup``): the target's cross-attention inside the mask,
   the source branch's outside. The mixup needs the source branch's maps at every step. Where
   they fit ``max_attention_store_gb`` (:func:`store_source_maps`; 16.6 MB per step and image for
   SD-1.5 at 256 px in float32) the source pass keeps them and the target pass evaluates the
   UNet 4 times per step; otherwise they are recomputed from the stored x_t^src in the target's
   batched UNet call (5 evaluations per step), and peak memory does not grow with the number of
   steps beyond the (N, B, h, w, C) source latents. ``single-pass`` mixes the live maps in one call.
2. **conditional score guidance** (Eq. 14-18, ``score_guidance``): the background is pulled toward
   the source trajectory, with weight lambda (``posterior_guidance``) under the cosine gate B_t.

The registry's ``csg-no-mixup`` (mixup "none") and ``ddim`` (neither: plain DDIM, Eq. 3) are
this plug-in with parts switched off.

Shapes: B images, latents (B, h, w, C), text contexts (B, 77, D), masks (B, h, w).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from csg_jax.editing.core import EditOutputs, EditRun, LayerPlan, Prompts, SourceResult, cfg, per_image, source_pass, unet
from csg_jax.editing.schema import knob, non_negative, positive
from csg_jax.models.attention import AttentionControl, blend_probs
from csg_jax.resize import resize_2d
from csg_jax.schedule import DDIMSchedule, ddim_transfer, gamma, sampling_plan

OPTIONS_KEY = "csg"
DEFAULTS: dict = {}  # the shared defaults are CSG's official ones


@dataclasses.dataclass(frozen=True)
class Options:
    """CSG (methods csg, csg-no-mixup, ddim)"""

    posterior_guidance: float = knob(10.0, "image", "lambda^pre of the conditional score guidance, Eq. 15")
    delta: float = knob(1.5, "image", "period of the cosine gate, Eq. 16", check=positive)
    mixup: str = knob("two-pass", "static", "cross-attention mixup (Eq. 13): official two UNet passes, one pass "
                      "mixing live maps, or none (= method csg-no-mixup)", choices=("two-pass", "single-pass", "none"))
    score_guidance: bool = knob(True, "static", "conditional score guidance, Eq. 14-18 (off: method ddim)", flag="")
    max_attention_store_gb: float = knob(
        4.0, "static", "two-pass mixup: keep the source pass's cross-attention maps of every step when they take at "
        "most this many GB per program (one UNet evaluation per step fewer), else recompute them (memory flat in "
        "the steps); 0: always recompute", check=non_negative)


def knobs(config):
    return None  # CSG's float settings are per-image knobs (posterior_guidance, delta)


def prepare(pipe, prompts: Prompts, config) -> Prompts:
    return prompts


def plan(pipe, latent_hw, layers: LayerPlan, config):
    return None


def edit(run: EditRun, x_T, prompts: Prompts, knobs, method_knobs=None, uncond=None) -> EditOutputs:
    """Source pass, then the target pass, from x_T (B, h, w, C); ``uncond`` (N, B, 77, D):
    per-step negative contexts (null-text) or None. With Direct Inversion (``run.source_path``)
    x_t^src -- what the guidance pulls toward, where the mask's statistics and the mixup's source
    maps are read -- is the inversion trajectory itself."""
    keep = store_source_maps(run.config, run.layers, x_T.shape[0], run.pipe.unet.dtype)
    source = source_pass(run.pipe, run.params, x_T, prompts, run.schedule, run.layers, uncond, knobs.guidance_scale,
                         keep_maps=keep, path=run.source_path)
    edited = target_pass(run.pipe, run.params, x_T, prompts, source, run.schedule, run.layers, run.config, knobs,
                         uncond)
    return EditOutputs(source.reconstruction, edited, source.mask_raw, source.mask)


def store_source_maps(config, layers: LayerPlan, batch: int, dtype) -> bool:
    """Whether the source pass keeps its cross-attention maps for the two-pass mixup: only there
    do they save an evaluation, and only if all steps' maps fit ``max_attention_store_gb``."""
    options = getattr(config, OPTIONS_KEY)
    if options.mixup != "two-pass":
        return False
    return source_maps_bytes(layers, batch, config.num_steps, dtype) <= options.max_attention_store_gb * 1e9


def source_maps_bytes(layers: LayerPlan, batch: int, num_steps: int, dtype, tokens: int = 77) -> int:
    """Bytes of every step's (B, heads, Q, tokens) cross-attention probabilities, all cross layers."""
    per = sum(l.heads * l.resolution[0] * l.resolution[1] for l in layers.cross_layers)
    return int(num_steps * batch * per * tokens * jnp.dtype(dtype).itemsize)


def unet_evaluations(config, stored_maps: bool = False, guided: bool = False) -> dict:
    """Per image and step: the source pass 1 (2 when ``guided``: CFG with per-step negatives);
    the target pass 2 (CFG), 3 with the single-pass mixup, 5 with the two-pass one (4 when it
    reads the source pass's stored maps)."""
    mixup = config.csg.mixup
    target = {"none": 2, "single-pass": 3}.get(mixup, 4 if stored_maps else 5)
    return {"source": 2 if guided else 1, "target": target}


def mixup_weights(mask: jax.Array, layers: LayerPlan) -> dict:
    """Per cross layer, the foreground weight of Eq. 13: M-hat resized bilinearly to the layer's
    resolution and divided by its own max (official). (B, h, w) -> {name: (B, Q)}."""
    out = {}
    for layer in layers.cross_layers:
        m = resize_2d(mask, layer.resolution, "bilinear")
        m = m / jnp.max(m, axis=(1, 2), keepdims=True)
        out[layer.name] = m.reshape(m.shape[0], -1)
    return out


def guidance_gate(step_index, num_steps: int, background: jax.Array, delta) -> jax.Array:
    """B_t of Eq. 16 with the official loop index: 1[P >= 1 - max(cos(pi i / (delta (N-1))), 0)]."""
    c = jnp.maximum(jnp.cos(jnp.pi * step_index / (delta * (num_steps - 1))), 0.0)
    return (background >= 1.0 - c).astype(background.dtype)


def target_pass(pipe, params, x_T, prompts: Prompts, source: SourceResult, schedule: DDIMSchedule,
                layers: LayerPlan, config, knobs, uncond: Optional[jax.Array] = None) -> jax.Array:
    """Reverse process of the edit; returns the final latent (B, h, w, C).

    ``uncond`` (N, B, 77, D): per-step negative contexts (null-text inversion) instead of
    ``prompts.negative``.
    """
    b = x_T.shape[0]
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    n = timesteps.shape[0]
    background = (1.0 - source.mask)[..., None]  # P^src, Eq. 12, (B, h, w, 1)
    guidance_scale, posterior_guidance, delta = (per_image(k) for k in (knobs.guidance_scale, knobs.posterior_guidance,
                                                                       knobs.delta))  # () or (B, 1, 1, 1)
    mixup, score_guidance = config.csg.mixup, config.csg.score_guidance
    pair_ctx0 = jnp.concatenate([prompts.negative, prompts.target])
    if mixup != "none":
        weights = mixup_weights(source.mask, layers)
        triple_ctx0 = jnp.concatenate([prompts.source, pair_ctx0])
        pair_cols = jnp.concatenate([prompts.ref_columns, prompts.ref_columns])
        pair_weights = {k: jnp.concatenate([v, v]) for k, v in weights.items()}
        if mixup == "single-pass":
            ones = {k: jnp.ones_like(v) for k, v in weights.items()}
            identity = jnp.broadcast_to(jnp.arange(prompts.ref_columns.shape[1]), prompts.ref_columns.shape)
            live_mix = AttentionControl(
                mix={k: jnp.concatenate([ones[k], pair_weights[k]]) for k in weights},
                mix_ref_rows=jnp.tile(jnp.arange(b), 3),
                mix_ref_columns=jnp.concatenate([identity, pair_cols]).astype(jnp.int32),
            )
        record_all = AttentionControl(record=tuple((l.name, "probs") for l in layers.cross_layers))

    def model_output(x_tgt, x_src, t, negative=None, src_maps=None):
        """CFG output of the target branch (Eq. 13 mixup when enabled). ``src_maps``: this step's
        stored source cross-attention {name: (B, heads, Q, 77)}, or None to recompute it."""
        pair_x = jnp.concatenate([x_tgt, x_tgt])
        if negative is not None:  # this step's null-text embedding
            pair_ctx = jnp.concatenate([negative, prompts.target])
            triple_ctx = jnp.concatenate([prompts.source, pair_ctx])
        else:
            pair_ctx, triple_ctx = pair_ctx0, (triple_ctx0 if mixup != "none" else None)
        if mixup == "none":
            out, _ = unet(pipe, params, pair_x, t, pair_ctx)
        elif mixup == "single-pass":
            out, _ = unet(pipe, params, jnp.concatenate([x_src, pair_x]), t, triple_ctx, live_mix)
            out = out[b:]
        else:  # two-pass (official): record live maps, mix with the source branch's, run again
            if src_maps is None:  # the source branch evaluated beside the pair (batch 3B)
                _, rec = unet(pipe, params, jnp.concatenate([x_src, pair_x]), t, triple_ctx, record_all)
                live, src_maps = {k: p[b:] for k, p in rec.items()}, {k: p[:b] for k, p in rec.items()}
            else:  # the source pass's maps at this step: same input, same UNet, one evaluation fewer
                _, live = unet(pipe, params, pair_x, t, pair_ctx, record_all)
            inject = {
                name: blend_probs(p, jnp.concatenate([src_maps[name], src_maps[name]]), pair_weights[name], pair_cols)
                for name, p in live.items()
            }
            out, _ = unet(pipe, params, pair_x, t, pair_ctx, AttentionControl(inject=inject))
        uncond, cond = out[:b], out[b:]
        return cfg(uncond, cond, guidance_scale)

    def step(x_tgt, xs):
        i, t, a_t, a_prev, x_src, src_maps, *negative = xs
        out = model_output(x_tgt, x_src, t, negative[0] if negative else None, src_maps)
        x_prev = ddim_transfer(out, x_tgt, a_t, a_prev, schedule.prediction_type)
        if score_guidance:  # Eq. 14-18: pull the background toward the source trajectory
            omega = posterior_guidance * background * guidance_gate(i, n, background, delta)
            x_prev = x_prev - gamma(a_t, a_prev) * omega * (x_tgt - x_src)
        return x_prev, None

    xs = (jnp.arange(n), timesteps, alpha_t, alpha_prev, source.trajectory, source.cross_maps)
    xs += () if uncond is None else (uncond,)
    edited, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
    return edited
