"""What every editing method shares, once: the batched prompts, the UNet call, the CFG combine,
DDIM inversion, the layer plan and the source pass with its mask statistics.

* :func:`ddim_inversion`  x_0 -> x_T, DDIM inversion on the source prompt (CSG Eq. 1), no CFG.
* :func:`source_path` / :func:`follow`  Direct Inversion (Ju et al., ICLR 2024): the inversion's
  latents in sampling order, and the correction that puts a source branch back on them.
* :func:`source_pass`     x_T -> reconstruction, recording per step the latent x_t^src and the
  running sums of the mask statistics (cross-attention of the source word, self-attention of the
  finest up-block layer). Both CFG halves of the official code are identical (the negative
  prompt *is* the source prompt), so one UNet evaluation per step suffices.

Shapes: B images, latents (B, h, w, C), text contexts (B, 77, D), masks (B, h, w).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from csg_jax.models.attention import AttentionControl, summarise_probs
from csg_jax.models.unet import LayerInfo, attention_layers
from csg_jax.resize import resize_2d
from csg_jax.schedule import DDIMSchedule, ddim_transfer, inversion_plan, sampling_plan


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


def per_image(v) -> jax.Array:
    """A () knob as is, a (B,) knob as (B, 1, 1, 1): broadcastable against (B, h, w, C) latents."""
    v = jnp.asarray(v)
    return v.reshape(-1, 1, 1, 1) if v.ndim == 1 else v


def unet(pipe, params, x, t, ctx, control=None):
    """The UNet's output in float32 (whatever the activation dtype) and its attention records."""
    out, records = pipe.unet.apply({"params": params["unet"]}, x, t, ctx, control)
    return out.astype(jnp.float32), records


def cfg(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: uncond + scale (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def ddim_inversion(pipe, params, x0, ctx, schedule: DDIMSchedule, variant: str = "standard",
                   noise_fn: Optional[Callable] = None, trajectory: bool = False):
    """DDIM inversion (CSG Eq. 1) of scaled latents x0 (B, h, w, C) on ``ctx`` (B, 77, D), no CFG.

    ``noise_fn(eps, step_index) -> eps`` may adjust each noise prediction (Pix2Pix-Zero's
    regularisation). Returns x_T, or with ``trajectory`` ``(x_T, (K, B, h, w, C))``: the latent
    *before* each of the K inversion steps (trajectory[0] = x0).
    """
    ts, a_from, a_to = inversion_plan(schedule, variant)

    def step(x, xs):
        i, t, a0, a1 = xs
        eps, _ = unet(pipe, params, x, t, ctx)
        if noise_fn is not None:
            eps = noise_fn(eps, i)
        return ddim_transfer(eps, x, a0, a1, schedule.prediction_type), (x if trajectory else None)

    x_T, path = jax.lax.scan(step, x0.astype(jnp.float32), (jnp.arange(ts.shape[0]), ts, a_from, a_to))
    return (x_T, path) if trajectory else x_T


def source_path(trajectory: jax.Array) -> jax.Array:
    """Direct Inversion's targets from a standard inversion's ``trajectory`` (N, B, h, w, C)
    (:func:`ddim_inversion`, latents before each inversion step): in sampling order, entry i is the
    latent sampling step i should end at (the inversion latent of the next timestep; the last is
    x_0). The standard inversion mirrors the sampler step for step, so this is the reversal."""
    return trajectory[::-1]


def follow(x_next: jax.Array, z_next: Optional[jax.Array]) -> jax.Array:
    """Direct Inversion's correction of a source branch after a step: add the difference between
    the inversion latent and the branch's own, as the released code adds its precomputed offset.
    The branch then *is* the inversion trajectory; ``z_next`` None: unchanged."""
    return x_next if z_next is None else x_next + (z_next - x_next)


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
    # activation dtype; None where the target pass recomputes it (csg.store_source_maps)
    cross_maps: Optional[dict] = None


def source_pass(pipe, params, x_T, prompts: Prompts, schedule: DDIMSchedule, layers: LayerPlan,
                uncond: Optional[jax.Array] = None, guidance_scale=None, keep_maps: bool = False,
                path: Optional[jax.Array] = None) -> SourceResult:
    """Reverse DDIM on the source prompt, recording what the mask and the guidance need.

    With ``uncond`` (N, B, 77, D), per-step negative contexts from null-text inversion, each step
    is classifier-free guided, eps(uncond_i) + g (eps(source) - eps(uncond_i)) (two UNet
    evaluations; the statistics come from the conditional half): the trajectory the null
    embeddings were optimised to follow. ``keep_maps``: also return every step's cross-attention
    probabilities (``SourceResult.cross_maps``) for the two-pass mixup. ``path`` (N, B, h, w, C):
    Direct Inversion's targets (:func:`source_path`); each step's latent is corrected onto them
    (:func:`follow`), so the trajectory is the inversion's and the reconstruction is x_0, while
    the statistics still come from the UNet at those latents.
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
        t, a_t, a_prev, z_next, *negative = xs
        if uncond is None:
            out, rec = unet(pipe, params, carry.latent, t, prompts.source, control)
        else:
            pair, rec = unet(pipe, params, jnp.concatenate([carry.latent] * 2), t,
                             jnp.concatenate([negative[0], prompts.source]), control)
            out = cfg(pair[:b], pair[b:], per_image(guidance_scale))
            rec = {k: v[b:] for k, v in rec.items()}
        maps = None
        if keep_maps:
            maps = {l.name: rec[l.name] for l in layers.cross_layers}
            rec = dict(rec, **{l.name: summarise_probs(rec[l.name], "token_mean", prompts.source_columns)
                               for l in layers.mask_layers})
        nxt = follow(ddim_transfer(out, carry.latent, a_t, a_prev, schedule.prediction_type), z_next)
        stats = SourceStats(
            nxt,
            carry.mask_sum + step_mask(rec, prompts, layers, (h, w)).astype(jnp.float32),
            carry.self_attn_sum + rec[layers.self_layer.name].astype(jnp.float32),
        )
        return stats, (carry.latent, maps)

    q = layers.self_layer.resolution[0] * layers.self_layer.resolution[1]
    init = SourceStats(x_T.astype(jnp.float32), jnp.zeros((b, h, w)), jnp.zeros((b, q, q)))
    xs = (timesteps, alpha_t, alpha_prev, path) + (() if uncond is None else (uncond,))
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


class EditRun(NamedTuple):
    """What a method's traced ``edit`` works with: the model and its params, the sampling
    schedule, the shared layer plan, the method's own plan and the static config; with
    ``inversion="direct"`` the inversion latents its source branch must follow."""

    pipe: Any
    params: Any
    schedule: DDIMSchedule
    layers: LayerPlan
    plan: Any  # the plug-in's ``plan(...)`` result (None if it has none)
    config: Any  # static EditConfig
    # (N, B, h, w, C) Direct Inversion's targets (:func:`source_path`): after sampling step i the source
    # branch is put onto source_path[i] (:func:`follow`); the target branch is left to the method. None: off.
    source_path: Optional[jax.Array] = None


class EditOutputs(dict):
    """Every method's edit result: a dict of arrays with at least ``reconstruction`` and
    ``edited`` (B, h, w, C) latents and ``mask_raw`` / ``mask`` (B, h, w); methods may add their
    own (P2P: ``word_maps``)."""

    def __init__(self, reconstruction, edited, mask_raw, mask, **extra):
        super().__init__(reconstruction=reconstruction, edited=edited, mask_raw=mask_raw, mask=mask, **extra)


jax.tree_util.register_pytree_node(
    EditOutputs, lambda d: (tuple(d.values()), tuple(d.keys())),
    lambda keys, values: EditOutputs(**dict(zip(keys, values))))
