"""Pix2Pix-Zero (Parmar et al., SIGGRAPH 2023) in the CSG engine: cross-attention guidance by
backpropagation through the UNet.

* **Edit direction**: the difference of the mean text-encoder states (all 77 positions) of two
  lists of sentences, one about the source concept and one about the target concept, added to
  the source prompt's states: the edited conditional context is ``source + direction``. Without
  sentence files the direction is ``target prompt - source prompt``, so the edited context is
  the target prompt's (:func:`edit_context`).
* **Reference maps**: the cross-attention probabilities of the source reconstruction pass
  (:func:`csg.source_pass`), recomputed at every step from its stored trajectory x_t^src in one
  extra UNet call (nothing is kept across steps, unlike the official per-step map dictionary).
* **Cross-attention guidance**, every step: one SGD step (``optax.sgd``, learning rate
  ``xa_guidance`` = 0.1) on both classifier-free-guidance copies of x_t of the loss
  sum_layers mean_(halves, heads) sum_(pixels, tokens) (M_edit - M_ref)^2 (:func:`attention_loss`),
  its gradient by ``jax.grad`` through the UNet; then the guided noise prediction at the updated
  latents (guidance 5 with the source prompt as negative) and a DDIM step. As in the official
  code, the step continues from the *negative* half's updated latent.
* **Inversion regularisation** (optional, ``noise_regularization``): during DDIM inversion each
  noise prediction takes 5 rounds of gradient steps on an auto-correlation loss (5 random rolls
  per round, image pyramid down to 8x8) and a KL(N(mu, var) || N(0, 1)) loss, both weighted
  20 (:func:`regularize_noise`).

UNet cost per step: reference maps 1 (2 with per-step null-text embeddings), the gradient pass
on 2 rows forward + backward (~3 evaluations each: reverse mode costs about two forwards), the
edited prediction 2: 9 image-evaluations, against CSG's 5 (+1 for the shared source pass).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csg_jax.editing.costs import BACKWARD_COST
from csg_jax.editing.core import EditOutputs, EditRun, LayerPlan, Prompts, cfg, per_image, source_pass, unet
from csg_jax.editing.schema import knob, non_negative
from csg_jax.errors import ConfigError
from csg_jax.models.attention import AttentionControl
from csg_jax.schedule import DDIMSchedule, ddim_transfer, sampling_plan

LAMBDA_AC = 20.0  # weight of the auto-correlation regulariser (official)
LAMBDA_KL = 20.0  # weight of the KL regulariser (official)
REG_STEPS = 5  # rounds of regularisation per noise prediction
AC_ROLLS = 5  # random rolls per round


OPTIONS_KEY = "pix2pix_zero"
# released ddim_inv.py: timesteps[1:-1] of the flipped schedule (our "official" N-2 step variant)
# with the regularised noise, always on in its edit_real.py
DEFAULTS = {"inversion": "official", "noise_regularization": True}


@dataclasses.dataclass(frozen=True)
class Options:
    """Pix2Pix-Zero (--method pix2pix-zero)"""

    xa_guidance: float = knob(0.1, "batch", "cross-attention guidance: SGD step on x_t", check=non_negative)
    source_sentences: Optional[str] = knob(None, "host", "sentences about the source concept, one a line (or a "
                                           ".pt / .npy mean embedding)", type=str, flag="--source-sentences")
    target_sentences: Optional[str] = knob(None, "host", "sentences about the target concept: edit direction = "
                                           "difference of the mean embeddings (default: target - source prompt)",
                                           type=str)

    def __post_init__(self):
        if (self.source_sentences is None) != (self.target_sentences is None):
            raise ConfigError("give both source_sentences and target_sentences (the edit direction), or neither")


class Knobs(NamedTuple):
    """Pix2Pix-Zero's float settings, passed as arrays (no recompilation when swept)."""

    xa_guidance: jax.Array  # () learning rate of the SGD step on x_t

    @classmethod
    def from_config(cls, config) -> "Knobs":
        return cls(jnp.asarray(config.pix2pix_zero.xa_guidance, jnp.float32))


def knobs(config) -> Knobs:
    return Knobs.from_config(config)


def prepare(pipe, prompts: Prompts, config) -> Prompts:
    return edit_context(pipe, prompts, config)


def plan(pipe, latent_hw, layers: LayerPlan, config):
    return None


def edit(run: EditRun, x_T, prompts: Prompts, knobs, p2pz_knobs: Knobs, uncond=None) -> EditOutputs:
    """The source pass (its trajectory gives the reference maps; with Direct Inversion it is the
    inversion's, ``run.source_path``), then the guided target pass."""
    source = source_pass(run.pipe, run.params, x_T, prompts, run.schedule, run.layers, uncond, knobs.guidance_scale,
                         path=run.source_path)
    edited = target_pass(run.pipe, run.params, x_T, prompts, source, run.schedule, run.layers, knobs, p2pz_knobs,
                         uncond)
    return EditOutputs(source.reconstruction, edited, source.mask_raw, source.mask)


def unet_evaluations(config, stored_maps: bool = False, guided: bool = False) -> dict:
    """Per image and step: the source pass (2 when ``guided``: CFG with per-step negatives), then
    reference maps, the gradient on both CFG halves (1 + BACKWARD_COST each) and the edited
    prediction (2)."""
    source = 2 if guided else 1
    return {"source": source, "target": source + 2 * (1 + BACKWARD_COST) + 2}


# -- edit direction -------------------------------------------------------------------------------

def read_sentences(path: str) -> list[str]:
    """The file's non-blank lines, stripped. (The released ``make_edit_direction.py`` also embeds
    blank lines, as empty sentences: a slip of a hand-edited file, not a sentence; we skip them.)"""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise ConfigError(f"cannot read the sentence file {path}: {e}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"{path} holds no sentences (one per line)")
    return lines


def load_mean_embedding(pipe, path: str) -> np.ndarray:
    """(77, D) mean sentence embedding from ``path``: a text file of sentences, or a precomputed
    mean as the released code ships them (``assets/embeddings_sd_1.4/cat.pt``, a torch tensor
    (1, 77, 768); reading it needs torch) or as a ``.npy`` array."""
    if path.endswith((".pt", ".npy")):
        try:
            if path.endswith(".npy"):
                emb = np.load(path)
            else:
                import torch

                emb = torch.load(path, map_location="cpu").float().numpy()
        except ImportError:
            raise ConfigError(f"reading {path} needs torch (pip install torch==2.13.0), or save it as .npy") from None
        except Exception as e:
            raise ConfigError(f"cannot read the embedding file {path}: {e}") from None
        emb = np.asarray(emb, np.float32)
        emb = emb[0] if emb.ndim == 3 else emb
        want = (pipe.max_length, pipe.text_encoder.config.hidden_size)
        if emb.shape != want:
            raise ConfigError(f"{path}: embedding of shape {emb.shape}, the model needs {want}")
        return emb
    return mean_embedding(pipe, read_sentences(path))


def mean_embedding(pipe, sentences: Sequence[str], batch: int = 64) -> np.ndarray:
    """(77, D) mean over sentences of the final text-encoder states (padded to 77, as official)."""
    total = None
    for i in range(0, len(sentences), batch):
        states = np.asarray(pipe.embed(list(sentences[i : i + batch])), np.float64).sum(0)
        total = states if total is None else total + states
    return (total / len(sentences)).astype(np.float32)


def edit_context(pipe, prompts, config):
    """``prompts`` with ``target`` = source + edit direction (from ``config``'s sentence files);
    unchanged (target = source + (target - source)) without files."""
    o = config.pix2pix_zero
    if o.source_sentences is None:
        return prompts
    direction = load_mean_embedding(pipe, o.target_sentences) - load_mean_embedding(pipe, o.source_sentences)
    return prompts._replace(target=prompts.source + jnp.asarray(direction, prompts.source.dtype)[None])


# -- cross-attention guidance ---------------------------------------------------------------------

def attention_loss(records: dict, reference: dict, batch: int) -> tuple[jax.Array, jax.Array]:
    """Official loss, per image: sum over layers of mean over (CFG halves, heads) of
    sum over (pixels, tokens) of (M - M_ref)^2.

    records, reference: {layer: (2B, N, Q, T)} probabilities, rows = [negative half; edit half].
    Returns (sum over images, (B,) per image); the sum's gradient is each image's own.
    """
    per_image = 0.0
    for name, probs in records.items():
        d = jnp.sum(jnp.square(probs.astype(jnp.float32) - reference[name].astype(jnp.float32)), axis=(-2, -1))
        per_image = per_image + d.reshape(2, batch, -1).mean(axis=(0, 2))
    return jnp.sum(per_image), per_image


def cross_attention_loss(pipe, params, x_pair, t, pair_ctx, reference: dict, names: Sequence[str]) -> jax.Array:
    """The scalar whose gradient with respect to ``x_pair`` (2B, h, w, C) guides the edit."""
    control = AttentionControl(record=tuple((name, "probs") for name in names))
    _, records = unet(pipe, params, x_pair, t, pair_ctx, control)
    return attention_loss(records, reference, x_pair.shape[0] // 2)[0]


def target_pass(pipe, params, x_T, prompts, source, schedule: DDIMSchedule, layers, knobs, p2pz_knobs: Knobs,
                uncond: Optional[jax.Array] = None) -> jax.Array:
    """The Pix2Pix-Zero edit from x_T (B, h, w, C); returns the final latent.

    prompts.target must hold the edited context (source + direction, :func:`edit_context`);
    ``source`` is :func:`core.source_pass`'s result (its trajectory gives the reference maps);
    ``layers.cross_layers`` are the guided layers (all cross-attention layers, official);
    ``uncond`` (N, B, 77, D): per-step negative contexts (null-text) instead of prompts.negative.
    """
    b = x_T.shape[0]
    timesteps, alpha_t, alpha_prev = sampling_plan(schedule)
    names = tuple(l.name for l in layers.cross_layers)
    record_all = AttentionControl(record=tuple((name, "probs") for name in names))
    g = per_image(knobs.guidance_scale)
    sgd = optax.sgd(p2pz_knobs.xa_guidance)
    call = lambda x, t, ctx, control=None: unet(pipe, params, x, t, ctx, control)

    def step(x, xs):
        t, a_t, a_prev, x_src, *negative = xs
        negative = negative[0] if negative else prompts.negative
        if uncond is None:  # both CFG halves of the reconstruction pass see the same maps
            _, ref = call(x_src, t, prompts.source, record_all)
            ref = {k: jnp.concatenate([v, v]) for k, v in ref.items()}
        else:  # reconstruction pass guided with the null embedding: each half its own reference
            _, ref = call(jnp.concatenate([x_src, x_src]), t, jnp.concatenate([negative, prompts.source]), record_all)
        ref = jax.lax.stop_gradient(ref)
        pair_ctx = jnp.concatenate([negative, prompts.target])
        x_pair = jnp.concatenate([x, x])
        grad = jax.grad(cross_attention_loss, argnums=2)(pipe, params, x_pair, t, pair_ctx, ref, names)
        updates, _ = sgd.update(grad, sgd.init(x_pair))
        x_pair = optax.apply_updates(x_pair, updates)
        out, _ = call(x_pair, t, pair_ctx)
        eps = cfg(out[:b], out[b:], g)
        return ddim_transfer(eps, x_pair[:b], a_t, a_prev, schedule.prediction_type), None  # official: negative half

    xs = (timesteps, alpha_t, alpha_prev, source.trajectory) + (() if uncond is None else (uncond,))
    edited, _ = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
    return edited


# -- inversion regularisation ---------------------------------------------------------------------

def _auto_correlation_channel(x: jax.Array, shifts: jax.Array) -> jax.Array:
    loss, level = 0.0, 0
    while True:
        s = shifts[level]
        loss = loss + jnp.mean(x * jnp.roll(x, s, axis=0)) ** 2
        loss = loss + jnp.mean(x * jnp.roll(x, s, axis=1)) ** 2
        if x.shape[0] <= 8:
            return loss
        h, w = x.shape
        x = x[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # avg_pool2d(2)
        level += 1


def auto_correlation_loss(noise: jax.Array, shifts: jax.Array) -> jax.Array:
    """Official auto-correlation loss of one image's noise (h, w, C): for each channel and each
    pyramid level (2x2 average pooling until the side is 8 or less), the squared mean of the
    product with itself rolled by ``shifts[level, channel]`` along each axis.
    shifts: (levels, C) int, each in [0, side // 2) (official: random)."""
    return jnp.sum(jax.vmap(_auto_correlation_channel, in_axes=(2, 1))(noise, shifts))


def pyramid_sizes(height: int) -> list[int]:
    sizes = [height]
    while sizes[-1] > 8:
        sizes.append(sizes[-1] // 2)
    return sizes


def kl_divergence(noise: jax.Array) -> jax.Array:
    """var + mu^2 - 1 - log(var + 1e-7) of one image's noise (unbiased variance, as torch)."""
    var = jnp.var(noise, ddof=1)
    return var + jnp.mean(noise) ** 2 - 1 - jnp.log(var + 1e-7)


def regularize_noise(eps: jax.Array, key: jax.Array) -> jax.Array:
    """Pix2Pix-Zero's regularisation of a noise prediction (B, h, w, C), image by image.

    The released roll amounts are Python's ``random.randrange(1, side // 2)`` per roll, channel and
    level (``ddim_inv.py`` since 2024-09; before, ``randrange(side // 2)`` could roll by 0, which
    turns the loss into the mean square and shrinks the noise); here they are drawn from ``key``
    (the same for every image of the batch) in the same range, 1 where side // 2 <= 1.
    """
    sizes = pyramid_sizes(eps.shape[1])
    channels = eps.shape[-1]
    ac_grad = jax.vmap(jax.grad(auto_correlation_loss), in_axes=(0, None))
    kl_grad = jax.vmap(jax.grad(kl_divergence))

    def roll_step(j, e):  # j = round * AC_ROLLS + roll
        sub = jax.random.fold_in(key, j)
        shifts = jnp.stack([jax.random.randint(jax.random.fold_in(sub, lvl), (channels,), 1, max(2, s // 2))
                            for lvl, s in enumerate(sizes)])
        return e - LAMBDA_AC * ac_grad(e, shifts) / AC_ROLLS

    def round_step(r, e):
        e = jax.lax.fori_loop(r * AC_ROLLS, (r + 1) * AC_ROLLS, roll_step, e)
        return e - LAMBDA_KL * kl_grad(e)

    return jax.lax.fori_loop(0, REG_STEPS, round_step, eps)


def noise_regularizer(key: jax.Array):
    """``noise_fn(eps, step_index)`` for :func:`null_text.ddim_inversion`: a fresh key per step."""
    return lambda eps, i: regularize_noise(eps, jax.random.fold_in(key, i))
