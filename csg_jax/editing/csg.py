"""Conditional Score Guidance (Algorithm 1) as pure, jit-compiled JAX.

Three scans over timesteps, each one ``lax.scan`` inside ``jit``:

1. :func:`invert`       x_0 -> x_T, DDIM inversion on the source prompt (Eq. 1).
2. :func:`source_pass`  x_T -> reconstruction, recording per step the latent x_t^src and the
   running sums of the mask statistics (cross-attention of the source word, self-attention of
   the finest up-block layer). Both CFG halves of the official code are identical here (the
   negative prompt *is* the source prompt), so one UNet evaluation per step suffices.
3. :func:`target_pass`  x_T -> edit with cross-attention mixup (Eq. 13) and conditional score
   guidance (Eq. 14-18). The mixup needs the source branch's cross-attention maps at every
   step. Where they fit ``EditConfig.max_attention_store_gb`` (:func:`store_source_maps`; 16.6 MB
   per step and image for SD-1.5 at 256 px in float32) the source pass keeps them and the
   target pass evaluates the UNet 4 times per step; otherwise they are recomputed from the
   stored x_t^src in the target's batched UNet call (5 evaluations per step), and peak memory
   does not grow with the number of steps beyond the (N, B, h, w, C) source latents.

Shapes: B images, latents (B, h, w, C), text contexts (B, 77, D), masks (B, h, w).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.editing.config import EditConfig
from csg_jax.models.attention import AttentionControl, blend_probs, summarise_probs
from csg_jax.models.unet import LayerInfo, attention_layers
from csg_jax.resize import resize_2d
from csg_jax.schedule import DDIMSchedule, ddim_transfer, gamma, inversion_plan, sampling_plan


class Knobs(NamedTuple):
    """Float settings passed as arrays, so sweeping them does not recompile.

    Each is a scalar () shared by the batch, or a (B,) array with one value per image (datasets
    whose items override guidance_scale / posterior_guidance / delta).
    """

    guidance_scale: jax.Array  # () or (B,) classifier-free guidance scale
    posterior_guidance: jax.Array  # () or (B,) lambda^pre, Eq. 15
    delta: jax.Array  # () or (B,) period of the cosine gate, Eq. 16

    @classmethod
    def from_config(cls, config: EditConfig) -> "Knobs":
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(f(config.guidance_scale), f(config.posterior_guidance), f(config.delta))

    @classmethod
    def stack(cls, configs) -> "Knobs":
        """(B,) float32 numpy arrays, one value per config (host arrays, ready for device_put)."""
        f = lambda name: np.asarray([getattr(c, name) for c in configs], np.float32)
        return cls(f("guidance_scale"), f("posterior_guidance"), f("delta"))


def per_image(v) -> jax.Array:
    """A () knob as is, a (B,) knob as (B, 1, 1, 1): broadcastable against (B, h, w, C) latents."""
    v = jnp.asarray(v)
    return v.reshape(-1, 1, 1, 1) if v.ndim == 1 else v


class Prompts(NamedTuple):
    """Per-image text conditioning, batched so different prompts share one compiled function."""

    source: jax.Array  # (B, 77, D) source-prompt states
    negative: jax.Array  # (B, 77, D) negative-prompt states (official: = source)
    target: jax.Array  # (B, 77, D) target-prompt states
    source_columns: jax.Array  # (B, K) int32, token positions of the source word (padded)
    source_weights: jax.Array  # (B, K) float32, 1/len(span) on the span, 0 on padding
    ref_columns: jax.Array  # (B, 77) int32, source column used for each target column (token matching)
    # Prompt-to-Prompt (local blend, equalizer); None where a caller builds Prompts without them.
    # Full-width (77 columns), so that target words of any length share one compiled program.
    target_weights: Optional[jax.Array] = None  # (B, 77) float32, 1/len(span) on the target words' columns
    reweight_columns: Optional[jax.Array] = None  # (B, 77) float32, 1 on the columns the equalizer scales
    # Prompt-to-Prompt's released token alignment (editing/p2p_align.py) and LocalBlend word columns
    p2p_matrix: Optional[jax.Array] = None  # (B, 77, 77) float32, target column t reads sum_s src[s] M[s, t]
    p2p_keep: Optional[jax.Array] = None  # (B, 77) float32, share of the target's own column kept
    blend_columns: Optional[jax.Array] = None  # (B, 2, 77) float32, 1 on every token of the source / target words


class SourceStats(NamedTuple):
    """Carry of the source pass: the latent and running sums of the mask statistics."""

    latent: jax.Array  # (B, h, w, C)
    mask_sum: jax.Array  # (B, h, w) sum over steps of per-step cross-attention masks
    self_attn_sum: jax.Array  # (B, Q, Q) sum over steps of head-averaged self-attention (Q = h*w in SD)


class SourceResult(NamedTuple):
    reconstruction: jax.Array  # (B, h, w, C) final latent of the source pass
    trajectory: jax.Array  # (N, B, h, w, C) x_t^src before each step
    mask_raw: jax.Array  # (B, h, w) M: mean cross-attention mask, clamped to [0, 1]
    mask: jax.Array  # (B, h, w) M-hat = A . M (Eq. 11), the smoothed foreground mask
    # {cross layer: (N, B, heads, Q, 77)} the source branch's cross-attention at each step, in the
    # activation dtype; None where the target pass recomputes it (store_source_maps)
    cross_maps: Optional[dict] = None


class LayerPlan(NamedTuple):
    mask_layers: tuple[LayerInfo, ...]  # cross layers with H*W <= mask_res^2
    self_layer: LayerInfo  # finest self-attention: last up block, last transformer
    cross_layers: tuple[LayerInfo, ...]  # every cross-attention layer (mixup)
    mask_res: int


def plan_layers(unet_config, latent_hw: tuple[int, int], mask_res: int) -> LayerPlan:
    layers = attention_layers(unet_config, latent_hw)
    cross = tuple(l for l in layers if l.kind == "cross")
    mask_layers = tuple(l for l in cross if l.resolution[0] * l.resolution[1] <= mask_res * mask_res)
    if not mask_layers:
        coarsest = min(l.resolution[0] for l in cross)
        raise ValueError(f"mask_res={mask_res} is below the coarsest cross-attention resolution {coarsest}")
    self_layer = [l for l in layers if l.kind == "self"][-1]
    return LayerPlan(mask_layers, self_layer, cross, mask_res)


def _unet(pipe, params, x, t, ctx, control=None):
    out, records = pipe.unet.apply({"params": params["unet"]}, x, t, ctx, control)
    return out.astype(jnp.float32), records


def invert(pipe, params, x0, source_ctx, schedule: DDIMSchedule, variant: str = "standard"):
    """DDIM inversion (Eq. 1) of scaled latents x0 (B, h, w, C) on the source prompt, no CFG."""
    plan = inversion_plan(schedule, variant)

    def step(x, xs):
        t, a_from, a_to = xs
        out, _ = _unet(pipe, params, x, t, source_ctx)
        return ddim_transfer(out, x, a_from, a_to, schedule.prediction_type), None

    x_T, _ = jax.lax.scan(step, x0.astype(jnp.float32), plan)
    return x_T


def step_mask(records: dict, prompts: Prompts, layers: LayerPlan, latent_hw) -> jax.Array:
    """Per-step cross-attention mask (B, h, w), in the official order of operations:
    token column -> upsample each layer bicubically to mask_res -> average over layers ->
    divide by the max -> upsample bicubically to the latent size (may overshoot; no clamp)."""
    r = layers.mask_res
    maps = []
    for layer in layers.mask_layers:
        cols = records[layer.name]  # (B, Q, K) head-mean of the source word's columns
        m = jnp.einsum("bqk,bk->bq", cols, prompts.source_weights).reshape(-1, *layer.resolution)
        if layer.resolution != (r, r):
            m = resize_2d(m, (r, r), "bicubic")
        maps.append(m)
    m = jnp.mean(jnp.stack(maps), axis=0)
    m = m / jnp.max(m, axis=(1, 2), keepdims=True)
    return resize_2d(m, tuple(latent_hw), "bicubic")


def store_source_maps(config: EditConfig, layers: LayerPlan, batch: int, dtype) -> bool:
    """Whether the source pass keeps its cross-attention maps for the two-pass mixup: only there
    do they save an evaluation, and only if all steps' maps fit ``config.max_attention_store_gb``."""
    if not (config.uses_mixup and config.mixup == "two-pass"):
        return False
    return source_maps_bytes(layers, batch, config.num_steps, dtype) <= config.max_attention_store_gb * 1e9


def source_maps_bytes(layers: LayerPlan, batch: int, num_steps: int, dtype, tokens: int = 77) -> int:
    """Bytes of every step's (B, heads, Q, tokens) cross-attention probabilities, all cross layers."""
    per = sum(l.heads * l.resolution[0] * l.resolution[1] for l in layers.cross_layers)
    return int(num_steps * batch * per * tokens * jnp.dtype(dtype).itemsize)


def source_pass(pipe, params, x_T, prompts: Prompts, schedule: DDIMSchedule, layers: LayerPlan,
                uncond: Optional[jax.Array] = None, guidance_scale=None, keep_maps: bool = False) -> SourceResult:
    """Reverse DDIM on the source prompt, recording what the mask and the guidance need.

    With ``uncond`` (N, B, 77, D), per-step negative contexts from null-text inversion, each step
    is classifier-free guided, eps(uncond_i) + g (eps(source) - eps(uncond_i)) (two UNet
    evaluations; the statistics come from the conditional half): the trajectory the null
    embeddings were optimised to follow. ``keep_maps``: also return every step's cross-attention
    probabilities (``SourceResult.cross_maps``) for the two-pass mixup.
    """
    b, h, w, _ = x_T.shape
    if keep_maps:  # full maps of every cross layer; the mask's token means are taken from them below
        record = tuple((l.name, "probs") for l in layers.cross_layers)
    else:
        record = tuple((l.name, "token_mean") for l in layers.mask_layers)
    record += ((layers.self_layer.name, "head_mean"),)
    control = AttentionControl(record=record, token_columns=prompts.source_columns)
    if uncond is not None:
        control = AttentionControl(record=record, token_columns=jnp.concatenate([prompts.source_columns] * 2))
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)

    def step(carry: SourceStats, xs):
        t, a_t, a_prev, *negative = xs
        if uncond is None:
            out, rec = _unet(pipe, params, carry.latent, t, prompts.source, control)
        else:
            pair, rec = _unet(pipe, params, jnp.concatenate([carry.latent] * 2), t,
                              jnp.concatenate([negative[0], prompts.source]), control)
            out = pair[:b] + per_image(guidance_scale) * (pair[b:] - pair[:b])
            rec = {k: v[b:] for k, v in rec.items()}
        maps = None
        if keep_maps:
            maps = {l.name: rec[l.name] for l in layers.cross_layers}
            rec = dict(rec, **{l.name: summarise_probs(rec[l.name], "token_mean", prompts.source_columns)
                               for l in layers.mask_layers})
        nxt = ddim_transfer(out, carry.latent, a_t, a_prev, schedule.prediction_type)
        stats = SourceStats(
            nxt,
            carry.mask_sum + step_mask(rec, prompts, layers, (h, w)).astype(jnp.float32),
            carry.self_attn_sum + rec[layers.self_layer.name].astype(jnp.float32),
        )
        return stats, (carry.latent, maps)

    q = layers.self_layer.resolution[0] * layers.self_layer.resolution[1]
    init = SourceStats(x_T.astype(jnp.float32), jnp.zeros((b, h, w)), jnp.zeros((b, q, q)))
    xs = (timesteps, alpha_t, alpha_prev) + (() if uncond is None else (uncond,))
    final, (trajectory, cross_maps) = jax.lax.scan(step, init, xs)
    n = timesteps.shape[0]
    mask_raw = jnp.clip(final.mask_sum / n, 0.0, 1.0)
    self_attn = final.self_attn_sum / n
    sh, sw = layers.self_layer.resolution
    if (sh, sw) == (h, w):
        mask = jnp.einsum("bpj,bj->bp", self_attn, mask_raw.reshape(b, h * w)).reshape(b, h, w)  # Eq. 11
    else:  # finest self-attention coarser than the latent (not SD): smooth at its resolution
        coarse = resize_2d(mask_raw, (sh, sw), "bilinear").reshape(b, sh * sw)
        mask = resize_2d(jnp.einsum("bpj,bj->bp", self_attn, coarse).reshape(b, sh, sw), (h, w), "bicubic")
    return SourceResult(final.latent, trajectory, mask_raw, mask, cross_maps)


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
                layers: LayerPlan, config: EditConfig, knobs: Knobs, uncond: Optional[jax.Array] = None) -> jax.Array:
    """Reverse process of the edit; returns the final latent (B, h, w, C).

    ``uncond`` (N, B, 77, D): per-step negative contexts (null-text inversion) instead of
    ``prompts.negative``.
    """
    b = x_T.shape[0]
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    n = timesteps.shape[0]
    background = (1.0 - source.mask)[..., None]  # P^src, Eq. 12, (B, h, w, 1)
    guidance_scale, posterior_guidance, delta = (per_image(k) for k in knobs)  # () or (B, 1, 1, 1)
    pair_ctx0 = jnp.concatenate([prompts.negative, prompts.target])
    if config.uses_mixup:
        weights = mixup_weights(source.mask, layers)
        triple_ctx0 = jnp.concatenate([prompts.source, pair_ctx0])
        pair_cols = jnp.concatenate([prompts.ref_columns, prompts.ref_columns])
        pair_weights = {k: jnp.concatenate([v, v]) for k, v in weights.items()}
        if config.mixup == "single-pass":
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
            pair_ctx, triple_ctx = pair_ctx0, (triple_ctx0 if config.uses_mixup else None)
        if not config.uses_mixup:
            out, _ = _unet(pipe, params, pair_x, t, pair_ctx)
        elif config.mixup == "single-pass":
            out, _ = _unet(pipe, params, jnp.concatenate([x_src, pair_x]), t, triple_ctx, live_mix)
            out = out[b:]
        else:  # two-pass (official): record live maps, mix with the source branch's, run again
            if src_maps is None:  # the source branch evaluated beside the pair (batch 3B)
                _, rec = _unet(pipe, params, jnp.concatenate([x_src, pair_x]), t, triple_ctx, record_all)
                live, src_maps = {k: p[b:] for k, p in rec.items()}, {k: p[:b] for k, p in rec.items()}
            else:  # the source pass's maps at this step: same input, same UNet, one evaluation fewer
                _, live = _unet(pipe, params, pair_x, t, pair_ctx, record_all)
            inject = {
                name: blend_probs(p, jnp.concatenate([src_maps[name], src_maps[name]]), pair_weights[name], pair_cols)
                for name, p in live.items()
            }
            out, _ = _unet(pipe, params, pair_x, t, pair_ctx, AttentionControl(inject=inject))
        uncond, cond = out[:b], out[b:]
        return uncond + guidance_scale * (cond - uncond)

    def step(x_tgt, xs):
        i, t, a_t, a_prev, x_src, src_maps, *negative = xs
        out = model_output(x_tgt, x_src, t, negative[0] if negative else None, src_maps)
        x_prev = ddim_transfer(out, x_tgt, a_t, a_prev, schedule.prediction_type)
        if config.uses_guidance:  # Eq. 14-18: pull the background toward the source trajectory
            omega = posterior_guidance * background * guidance_gate(i, n, background, delta)
            x_prev = x_prev - gamma(a_t, a_prev) * omega * (x_tgt - x_src)
        return x_prev, None

    xs = (jnp.arange(n), timesteps, alpha_t, alpha_prev, source.trajectory, source.cross_maps)
    xs += () if uncond is None else (uncond,)
    edited, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
    return edited


BACKWARD_COST = 2  # a backward pass through the UNet counted as ~2 forward evaluations (reverse mode)


def unet_evaluations_per_step(config: EditConfig, stored_maps: bool = False) -> dict:
    """UNet image-evaluations per image per step of each phase (for benchmarks and meta.json).

    ``stored_maps``: the two-pass mixup reads the source pass's stored cross-attention maps
    (:func:`store_source_maps`) instead of re-evaluating the source branch.

    A gradient (forward + backward through the UNet) counts as 1 + BACKWARD_COST evaluations.
    P2P's "source" is its source branch, evaluated in the target's batched call. "null_text"
    (inversion "null-text") is the upper bound: one conditional evaluation, at most
    ``null_text_steps`` gradients of the negative branch, one final negative evaluation; early
    stopping takes fewer.
    """
    null = config.inversion == "null-text"
    cfg_source = 2 if null else 1  # with per-step null embeddings the source pass is guided
    grad = 1 + BACKWARD_COST
    if config.method == "p2p":
        per = {"inversion": 1, "source": 2, "target": 2}
    elif config.method == "pix2pix-zero":  # reference maps, gradient on both CFG halves, edited prediction
        per = {"inversion": 1, "source": cfg_source, "target": cfg_source + 2 * grad + 2}
    else:
        target = {"ddim": 2, "csg-no-mixup": 2}.get(config.method)
        if target is None:
            target = 3 if config.mixup == "single-pass" else (4 if stored_maps else 5)
        per = {"inversion": 1, "source": cfg_source, "target": target}
    if null:
        per["null_text"] = 2 + grad * int(config.null_text_steps)
    return per


def unet_evaluations(config: EditConfig, stored_maps: bool = False) -> int:
    per = unet_evaluations_per_step(config, stored_maps)
    n = config.num_steps
    inv = n - 2 if config.inversion == "official" else n
    return per["inversion"] * inv + sum(v for k, v in per.items() if k != "inversion") * n

