"""Prompt-to-Prompt (Hertz et al., ICLR 2023) in the CSG engine, as Google's released code does it.

Reference: ``google/prompt-to-prompt``, the null-text notebook (``null_text_w_ptp.ipynb``: the
real-image setting, DDIM sampling) unless an option names the stable notebook
(``prompt-to-prompt_stable.ipynb``); ``seq_aligner.py`` / ``ptp_utils.py`` for token alignment.
Each behaviour below says where the released code does it and which option gives the alternative.

Source and target branches are denoised together from the same inverted latent, one batched
UNet call per step with rows ``[source | negative, target | negative, source | source prompt,
target | target prompt]`` (each block B images). Everything P2P does to attention happens inside
that call through :class:`AttentionControl` ``mix`` with the *source-conditional rows of the same
call* as reference (``mix_ref_rows``), so no map is stored or recomputed:

* **cross-attention replacement**, steps i < int(cross_replace_steps (N + 1)) (the released alpha
  schedule has N + 1 entries), every cross layer: the target-conditional rows use the
  source-conditional rows' probabilities mapped onto the target's columns, ``p_src @ M``, times the
  equalizer (``AttentionReweight``: ``equalizer_scale`` on ``prompts.reweight_columns``, 1
  elsewhere), plus ``keep * p_tgt`` (``AttentionRefine``'s own columns for added words).
  ``token_alignment="released"``: M and keep from :mod:`p2p_align` (``seq_aligner``'s word-swap
  mapper when both prompts have as many words, its refinement alignment otherwise);
  ``"similarity"``: M gathers ``prompts.ref_columns`` (CSG's token matching), keep = 0;
* **self-attention replacement**, steps i < int(self_replace_steps N), in the layers chosen by
  ``self_replace_layers`` (released ``replace_self_attention``: an *absolute* query-pixel count,
  ``attn.shape[2] <= 32 ** 2`` in the null-text notebook = ``"null-text"``, ``<= 16 ** 2`` in the
  stable notebook = ``"stable"``; ``"scaled"``: H W <= (latent / 4)^2, the count the stable
  notebook's 16^2 is at 64x64 latents, scaled with the latent);
* later steps: the target's own attention (mix is then the identity);
* the negative rows are never touched (the released controller edits the conditional half only);
* **LocalBlend** (``local_blend``), from step int(blend_start N) on (null-text notebook: its
  ``start_blend=0.2`` counter; the stable notebook's acts from step 0: ``blend_start=0``): running
  sums over steps of the source word's map (source rows) and the target words' map (target rows),
  3x3 max-pooled, resized (nearest) to the latent, divided by their max and thresholded at
  ``blend_threshold``; the union is the mask, and the target latent after each step is
  x_src + mask (x_tgt - x_src).

  - ``blend_maps="released"``: the target rows' map is the probability *after* replacement. The
    released ``AttentionStore.forward`` records the layer's attention as a view, which
    ``AttentionControlEdit.forward`` then overwrites in place with the replaced attention; during
    the cross-replacement steps the target word's map is therefore the source word's, mapped.
    ``"own"``: the target's own softmax before replacement (the paper's description).
  - ``blend_layers="released"``: the cross layers the released store keeps (at most 32^2 query
    pixels; ``AttentionStore.forward``), taken as ``down[2:4] + up[:3]`` in call order (the mid block
    never), each layer's (heads, Q) rows read as blocks of 16x16 maps -- ``item.reshape(B, -1, 1,
    16, 16, 77)`` -- and averaged over all blocks. At SD 512 px these are exactly the five 16x16
    layers; at other sizes the released code reinterprets other layers' memory as 16x16 maps, and so
    do we (the edit then matches the released code, not an intent). Where it cannot (no such
    layers, or heads x Q not a multiple of 256) the released code fails and we raise a ConfigError
    naming the other option. ``"resolution"``: the cross layers at 16x16-equivalent resolution
    (latent / 4, mid block included where it matches), each read at its own resolution.
  - word columns: ``prompts.blend_columns`` (every occurrence of the words, ``get_word_inds``,
    summed) where given, else the source / target spans' weights.

Switching per step is done with 0/1 weight *arrays* chosen inside one compiled ``lax.scan``.
Outputs: the source branch's final latent (P2P's reconstruction), the edit, ``mask_raw`` = the
source word's cross-attention mask (CSG's per-step mask, averaged over steps, clamped),
``mask`` = the LocalBlend mask (or ``mask_raw`` without blending) and ``word_maps``, the
LocalBlend word maps it is made from.

P2P's own defaults are guidance 7.5 with the empty negative prompt
(``EditConfig.for_method("p2p")``); the CSG paper compares at guidance 5 with the source prompt
as negative (``EditConfig(method="p2p")``). Sampling is DDIM, as in the null-text notebook (the
stable notebook generates with SD-1.4's default PNDM scheduler; real-image editing needs DDIM's
inversion). UNet cost: 4 image-evaluations per step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from csg_jax.editing.core import EditOutputs, EditRun, LayerPlan, Prompts, cfg, follow, per_image, step_mask, unet
from csg_jax.editing.schema import fraction, knob, non_negative
from csg_jax.errors import ConfigError
from csg_jax.models.attention import AttentionControl
from csg_jax.models.unet import LayerInfo, attention_layers
from csg_jax.resize import resize_2d
from csg_jax.schedule import ddim_transfer, sampling_plan

OPTIONS_KEY = "p2p"
DEFAULTS = {"guidance_scale": 7.5, "negative_prompt": "empty"}  # the notebooks' GUIDANCE_SCALE, "" negative


@dataclasses.dataclass(frozen=True)
class Options:
    """Prompt-to-Prompt (--method p2p)"""

    cross_replace_steps: float = knob(0.8, "batch", "fraction of steps whose target cross-attention is the source's",
                                      check=fraction)
    self_replace_steps: float = knob(0.4, "batch", "fraction of steps whose coarse self-attention is the source's",
                                     check=fraction)
    local_blend: bool = knob(False, "static", "LocalBlend: keep the latent outside the source / target word maps")
    blend_threshold: float = knob(0.3, "batch", "LocalBlend threshold on the max-normalised word maps", check=fraction)
    blend_start: float = knob(0.2, "batch", "LocalBlend acts from this fraction of the steps on (the null-text "
                              "notebook; the stable notebook: 0)", check=fraction)
    equalizer_words: Optional[str] = knob(None, "host", "target-prompt words to re-weight (default: the target words)",
                                          type=str)
    equalizer_scale: float = knob(1.0, "batch", "factor on their cross-attention columns (1: no re-weighting)",
                                  check=non_negative)
    self_replace_layers: str = knob("null-text", "static", "self-attention layers replaced: <= 32x32 query pixels "
                                    "(null-text notebook), <= 16x16 (stable notebook) or <= (latent/4)^2 (scaled)",
                                    choices=("null-text", "stable", "scaled"))
    blend_layers: str = knob("released", "static", "LocalBlend maps: the released layer set read as 16x16 maps, or "
                             "the cross layers at latent/4 resolution", choices=("released", "resolution"))
    blend_maps: str = knob("released", "static", "LocalBlend target-word map: after replacement, as released, or the "
                           "target's own attention (the paper's description)", choices=("released", "own"))
    token_alignment: str = knob("released", "static", "target columns read the source's by seq_aligner's word-swap / "
                                "refinement mapper, or by CSG's embedding-similarity matching",
                                choices=("released", "similarity"))


class Knobs(NamedTuple):
    """P2P's settings as arrays (sweeping them does not recompile). Step counts follow P2P's
    rounding of the fractions (host-side Python ints, so 0.7 x 10 is 7, not 6)."""

    cross_steps: jax.Array  # () int32, steps i < cross_steps replace cross-attention
    self_steps: jax.Array  # () int32, steps i < self_steps replace coarse self-attention
    blend_start: jax.Array  # () int32, LocalBlend acts at steps i >= blend_start
    blend_threshold: jax.Array  # () float32
    equalizer_scale: jax.Array  # () float32

    @classmethod
    def from_config(cls, config) -> "Knobs":
        n, o = config.num_steps, config.p2p
        i = lambda v: jnp.asarray(int(v), jnp.int32)
        f = lambda v: jnp.asarray(v, jnp.float32)
        return cls(i(o.cross_replace_steps * (n + 1)), i(o.self_replace_steps * n), i(o.blend_start * n),
                   f(o.blend_threshold), f(o.equalizer_scale))


# released replace_self_attention: layers with at most this many query pixels
_SELF_PIXELS = {"null-text": 32**2, "stable": 16**2}
_STORED_PIXELS = 32**2  # released AttentionStore.forward keeps maps of layers up to 32^2 pixels
_BLEND_SIDE = 16  # released LocalBlend reads every map as 16x16


class Layers(NamedTuple):
    cross: tuple[LayerInfo, ...]  # every cross-attention layer (replaced)
    self_replaced: tuple[LayerInfo, ...]  # self-attention layers whose maps are replaced
    blend: tuple[LayerInfo, ...]  # cross layers of the LocalBlend maps
    blend_hw: tuple[int, int]  # (r, r) of the LocalBlend word maps
    blend_released: bool  # maps read as the released code's 16x16 blocks (else at each layer's resolution)
    mask: LayerPlan  # layers of the source-word mask (mask_raw)


def knobs(config) -> Knobs:
    return Knobs.from_config(config)


def prepare(pipe, prompts: Prompts, config) -> Prompts:
    return prompts  # the alignment and word columns come with every batch (editing/plans.py)


def plan(pipe, latent_hw, layers: LayerPlan, config) -> "Layers":
    return plan_layers(pipe.unet.config, latent_hw, layers, config)


def unet_evaluations(config, stored_maps: bool = False, guided: bool = False) -> dict:
    """Per image and step: the source and the target branch, each with CFG (one batched call),
    whatever ``guided``."""
    return {"source": 2, "target": 2}


def plan_layers(unet_config, latent_hw: tuple[int, int], mask_plan: LayerPlan, config) -> Layers:
    """The layers each P2P rule touches (module docstring). ConfigError where ``config`` asks for
    LocalBlend with the released layer set and the released code could not read it here."""
    config = config.p2p
    layers = attention_layers(unet_config, latent_hw)
    area = lambda l: l.resolution[0] * l.resolution[1]
    cross = tuple(l for l in layers if l.kind == "cross")
    coarse = max(1, latent_hw[0] // 4) * max(1, latent_hw[1] // 4)
    limit = _SELF_PIXELS.get(config.self_replace_layers, coarse)
    self_replaced = tuple(l for l in layers if l.kind == "self" and area(l) <= limit)
    if config.blend_layers == "released":
        stored = [l for l in cross if area(l) <= _STORED_PIXELS]
        down = [l for l in stored if l.name.startswith("down_blocks.")]
        up = [l for l in stored if l.name.startswith("up_blocks.")]
        blend = tuple(down[2:4] + up[:3])
        blend_hw = (_BLEND_SIDE, _BLEND_SIDE)
        bad = [l for l in blend if (l.heads * area(l)) % (_BLEND_SIDE**2)]
        if config.local_blend and (not blend or bad):
            why = ("no layer is selected" if not blend else
                   f"{bad[0].name} has {bad[0].heads} heads x {area(bad[0])} pixels, not a multiple of 256")
            raise ConfigError(
                f"LocalBlend with blend_layers='released' reads the 3rd-4th down and 1st-3rd up cross-attention "
                f"layers of at most 32x32 pixels as 16x16 maps, as the released code does; at this model and "
                f"image size it cannot ({why}). Use blend_layers='resolution' (--blend-layers resolution).")
    else:
        best = min({area(l) for l in cross}, key=lambda a: (abs(a - coarse), a))
        blend = tuple(l for l in cross if area(l) == best)
        blend_hw = blend[0].resolution
    return Layers(cross, self_replaced, blend, blend_hw, config.blend_layers == "released", mask_plan)


def blend_mask(word_maps: jax.Array, latent_hw, threshold) -> jax.Array:
    """LocalBlend mask (B, h, w) in {0, 1} from (B, 2, r, r) source / target word maps: 3x3 max
    pooling (stride 1), nearest resize to the latent, division by the max, threshold, union."""
    pooled = jax.lax.reduce_window(word_maps, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 1, 1),
                                   ((0, 0), (0, 0), (1, 1), (1, 1)))
    m = resize_2d(pooled, tuple(latent_hw), "nearest")
    m = m / jnp.max(m, axis=(2, 3), keepdims=True)
    return jnp.any(m > threshold, axis=1).astype(jnp.float32)


def word_maps(records: dict, layers: Layers, weights: jax.Array) -> jax.Array:
    """One step's LocalBlend word maps (B, 2, r, r) from each blend layer's recorded probabilities
    (2, B, N, Q, 77) (source rows, target rows) and the word columns ``weights`` (B, 2, 77).

    Released layer set: a layer's (N, Q) rows, token-weighted, are cut into blocks of 256 in memory
    order and every block of every layer is one 16x16 map; the maps' mean. Otherwise: each layer's
    head-mean map at its own resolution, the layers' mean."""
    maps, counts = [], []
    for layer in layers.blend:
        r = records[layer.name].astype(jnp.float32)  # (2, B, N, Q, 77)
        v = jnp.einsum("sbnqt,bst->bsnq", r, weights)  # (B, 2, N, Q)
        b = v.shape[0]
        if layers.blend_released:
            blocks = v.reshape(b, 2, -1, *layers.blend_hw)  # (B, 2, N Q / 256, 16, 16)
            maps.append(blocks.sum(axis=2))
            counts.append(blocks.shape[2])
        else:
            maps.append(v.mean(axis=2).reshape(b, 2, *layers.blend_hw))
            counts.append(1)
    return sum(maps) / sum(counts)


def edit(run: EditRun, x_T, prompts: Prompts, knobs, p2p_knobs: Knobs, uncond: Optional[jax.Array] = None) -> EditOutputs:
    """P2P edit from x_T (B, h, w, C). ``uncond`` (N, B, 77, D): per-step negative contexts
    (null-text inversion) for both branches instead of ``prompts.negative``. With Direct Inversion
    (``run.source_path``) the source branch is corrected onto the inversion trajectory after every
    step (PnP Inversion's combination with P2P); the target branch keeps its own.

    Returns {"reconstruction", "edited"} latents (B, h, w, C), {"mask_raw", "mask"} (B, h, w) and
    "word_maps" (B, 2, r, r): LocalBlend's source / target word maps summed over the steps.
    """
    pipe, params, schedule, layers, config = run.pipe, run.params, run.schedule, run.plan, run.config.p2p
    b, h, w, _ = x_T.shape
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    n = timesteps.shape[0]
    g = per_image(knobs.guidance_scale)
    tokens = prompts.ref_columns.shape[1]
    rows = jnp.arange(b)
    eye = jnp.broadcast_to(jnp.eye(tokens, dtype=jnp.float32), (b, tokens, tokens))
    ones = jnp.ones((b, tokens), jnp.float32)
    zeros = jnp.zeros((b, tokens), jnp.float32)
    # the source word as full-width column weights (B, 77); the target words likewise
    src_w = jnp.zeros((b, tokens), jnp.float32).at[rows[:, None], prompts.source_columns].add(prompts.source_weights)
    tgt_w = src_w if prompts.target_weights is None else prompts.target_weights.astype(jnp.float32)  # word swap
    blend_w = jnp.stack([src_w, tgt_w], axis=1) if prompts.blend_columns is None else prompts.blend_columns
    reweight = prompts.reweight_columns if prompts.reweight_columns is not None else zeros
    equalizer = 1.0 + reweight * (p2p_knobs.equalizer_scale - 1.0)  # (B, 77)
    if config.token_alignment == "released" and prompts.p2p_matrix is not None:
        matrix, keep = prompts.p2p_matrix.astype(jnp.float32), prompts.p2p_keep.astype(jnp.float32)
    else:  # the similarity matching, as a matrix
        matrix, keep = jax.nn.one_hot(prompts.ref_columns, tokens, axis=1, dtype=jnp.float32), zeros

    # rows: [src|neg, tgt|neg, src|source, tgt|target]; only the last block is edited. AttentionReweight
    # scales the mapped source (and, under refinement, the target's kept columns) by the equalizer.
    ref_rows = jnp.concatenate([rows, b + rows, 2 * b + rows, 2 * b + rows])
    ref_matrix = jnp.concatenate([eye, eye, eye, matrix])
    ref_scale = jnp.concatenate([ones, ones, ones, equalizer])
    ref_keep = jnp.concatenate([zeros, zeros, zeros, keep * equalizer])
    blend_names = {l.name for l in layers.blend}
    record = tuple((name, "probs" if name in blend_names else "head_mean")
                   for name in dict.fromkeys([l.name for l in layers.mask.mask_layers] + sorted(blend_names)))
    edited_row = (jnp.arange(4 * b) >= 3 * b)[:, None]  # (4B, 1)
    ctx_cond = jnp.concatenate([prompts.source, prompts.target])
    mask_prompts = prompts._replace(source_weights=src_w)

    def weights(active, layer):  # (4B, Q): 0 (use the source's maps) on edited rows while active
        q = layer.resolution[0] * layer.resolution[1]
        return jnp.broadcast_to(jnp.where(edited_row & active, 0.0, 1.0), (4 * b, q))

    def step(carry, xs):
        x_src, x_tgt, word_sum, mask_sum = carry
        i, t, a_t, a_prev, z_next, *negative = xs
        negative = negative[0] if negative else prompts.negative
        mix = {l.name: weights(i < p2p_knobs.cross_steps, l) for l in layers.cross}
        mix.update({l.name: weights(i < p2p_knobs.self_steps, l) for l in layers.self_replaced})
        control = AttentionControl(record=record, mix=mix, mix_ref_rows=ref_rows, mix_ref_matrix=ref_matrix,
                                   mix_ref_scale=ref_scale, mix_keep=ref_keep,
                                   record_live=config.blend_maps == "own")
        x4 = jnp.concatenate([x_src, x_tgt, x_src, x_tgt])
        out, rec = unet(pipe, params, x4, t, jnp.concatenate([negative, negative, ctx_cond]), control)
        u_src, u_tgt, c_src, c_tgt = jnp.split(out, 4)
        # Direct Inversion: the source branch back on the inversion trajectory, before LocalBlend reads it
        x_src_next = follow(ddim_transfer(cfg(u_src, c_src, g), x_src, a_t, a_prev, schedule.prediction_type), z_next)
        x_tgt_next = ddim_transfer(cfg(u_tgt, c_tgt, g), x_tgt, a_t, a_prev, schedule.prediction_type)

        cond = {name: jnp.stack([rec[name][2 * b : 3 * b], rec[name][3 * b :]]) for name in blend_names}
        word_sum = word_sum + word_maps(cond, layers, blend_w)
        if config.local_blend:
            m = blend_mask(word_sum, (h, w), p2p_knobs.blend_threshold)[..., None]
            blended = x_src_next + m * (x_tgt_next - x_src_next)
            x_tgt_next = jnp.where(i >= p2p_knobs.blend_start, blended, x_tgt_next)

        src_rec = {}
        for l in layers.mask.mask_layers:
            r = rec[l.name][2 * b : 3 * b].astype(jnp.float32)
            src_rec[l.name] = r.mean(axis=1) if l.name in blend_names else r  # probs -> head mean
        mask_sum = mask_sum + step_mask(src_rec, mask_prompts, layers.mask, (h, w))
        return (x_src_next, x_tgt_next, word_sum, mask_sum), None

    x = x_T.astype(jnp.float32)
    init = (x, x, jnp.zeros((b, 2, *layers.blend_hw), jnp.float32), jnp.zeros((b, h, w), jnp.float32))
    xs = (jnp.arange(n), timesteps, alpha_t, alpha_prev, run.source_path) + (() if uncond is None else (uncond,))
    (x_src, x_tgt, word_sum, mask_sum), _ = jax.lax.scan(step, init, xs)
    mask_raw = jnp.clip(mask_sum / n, 0.0, 1.0)
    mask = blend_mask(word_sum, (h, w), p2p_knobs.blend_threshold) if config.local_blend else mask_raw
    return EditOutputs(x_src, x_tgt, mask_raw, mask, word_maps=word_sum)
