"""The editing API: one compiled program per model, latent size and static config.

:class:`Editor` holds the whole encode -> invert (or null-text) -> edit -> decode program for a
model, a latent size and the static part of a config (:meth:`EditConfig.static`): the pure,
jit-able :meth:`Editor.program` over a batch (dataset mode wraps it in ``shard_map``, the
benchmarks lower it), and its stages jitted one by one (:meth:`Editor.encode`, ``invert``,
``invert_null_text``, ``invert_direct``, ``edit``, ``decode``) so that an image is inverted once and edited for many
tasks without recompiling. The method is a plug-in (:mod:`csg_jax.editing.registry`);
``translate_image(pipe, image, prompt, task=... | target_prompt=..., config=EditConfig())`` runs
the program's stages on a batch of one.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.editing import costs, null_text, pix2pix_zero, registry
from csg_jax.editing.config import EditConfig, Knobs
from csg_jax.editing.core import EditOutputs, EditRun, Prompts, ddim_inversion, plan_layers, source_path
from csg_jax.editing.plans import PromptPlan, batch_prompts, plan_prompts  # noqa: F401  (the API)
from csg_jax.errors import ImageError
from csg_jax.schedule import make_schedule


def method_knobs(config: EditConfig):
    """The method's own ``batch`` settings as arrays (None where it has none)."""
    return registry.module(config.method).knobs(config)


def prepare_prompts(pipe, plans, config: EditConfig) -> Prompts:
    """Batched prompts of ``plans`` for ``config``'s method (its host-side ``prepare``)."""
    prompts = batch_prompts(pipe, plans, config.p2p.equalizer_words, config.p2p.token_alignment)
    return registry.module(config.method).prepare(pipe, prompts, config)


class Editor:
    """The compiled program for one pipeline, latent size and static config.

    ``trace_counts`` counts how often each stage was traced (= compiled), so callers and tests
    can check that repeated calls with equal shapes reuse the compiled program.
    """

    STAGES = ("encode", "invert", "null_text", "invert_direct", "edit", "decode", "program")

    def __init__(self, pipe, config: EditConfig, latent_hw: tuple[int, int]):
        self.pipe = pipe
        self.config = config.static()
        self.latent_hw = tuple(latent_hw)
        self.method = registry.module(config.method)
        self.schedule = make_schedule(pipe.scheduler_config, config.num_steps)
        mask_res = config.mask_res or pipe.defaults.get("mask_res") or config.mask_resolution(self.latent_hw)
        self.layers = plan_layers(pipe.unet.config, self.latent_hw, int(mask_res))
        self.plan = self.method.plan(pipe, self.latent_hw, self.layers, self.config)
        self.trace_counts = {"encode": 0, "invert": 0, "edit": 0, "decode": 0, "null_text": 0, "invert_direct": 0}
        self._jitted = {"encode": jax.jit(self._encode_impl), "invert": jax.jit(self._invert_impl),
                        "null_text": jax.jit(self._null_text_impl), "invert_direct": jax.jit(self._invert_direct_impl),
                        "edit": jax.jit(self._edit_impl),
                        "decode": jax.jit(self._decode_impl), "program": jax.jit(self.program)}
        self._sharded: dict = {}  # (mesh devices, sample) -> jit(shard_map(program)), see csg_jax.dataset

    # -- traced stages ------------------------------------------------------------------------------
    def _encode_impl(self, params, images, keys=None):
        """(B, H, W, 3) -> latents; keys None (posterior mean), one (2,) key for the batch, or (B, 2):
        image i then gets exactly the noise ``keys[i]`` draws for it alone, whatever the batch."""
        self.trace_counts["encode"] += 1
        if keys is not None and keys.ndim == 2:
            return encode_items(self.pipe.encode, params, images, keys)
        return self.pipe.encode(params, images, keys)

    def _noise_fn(self, rng):
        if not self.config.noise_regularization:
            return None
        return pix2pix_zero.noise_regularizer(jax.random.PRNGKey(0) if rng is None else rng)

    def _invert_impl(self, params, x0, source_ctx, rng=None):
        self.trace_counts["invert"] += 1
        variant = "official" if self.config.inversion == "official" else "standard"
        return ddim_inversion(self.pipe, params, x0, source_ctx, self.schedule, variant, self._noise_fn(rng))

    def _invert_direct_impl(self, params, x0, source_ctx, rng=None):
        """Direct Inversion: standard DDIM inversion keeping its latents -> (x_T, (N, B, h, w, C)
        targets of the source branch in sampling order, :func:`core.source_path`)."""
        self.trace_counts["invert_direct"] += 1
        x_T, trajectory = ddim_inversion(self.pipe, params, x0, source_ctx, self.schedule, "standard",
                                         self._noise_fn(rng), trajectory=True)
        return x_T, source_path(trajectory)

    def _null_text_impl(self, params, x0, prompts: Prompts, knobs: Knobs, rng=None):
        self.trace_counts["null_text"] += 1
        return null_text.null_text_inversion(self.pipe, params, x0, prompts.source, prompts.negative, self.schedule,
                                             knobs.guidance_scale, int(self.config.null_text_steps), self._noise_fn(rng))

    def _edit_impl(self, params, x_T, prompts: Prompts, knobs: Knobs, extra_knobs=None, uncond=None,
                   path=None) -> EditOutputs:
        """``extra_knobs``: :func:`method_knobs`; ``uncond``: (N, B, 77, D) null-text embeddings or None;
        ``path``: (N, B, h, w, C) Direct Inversion's targets of the source branch or None."""
        self.trace_counts["edit"] += 1
        if extra_knobs is None and self.method.knobs(self.config) is not None:
            raise ValueError(f"method {self.config.method!r} needs its knobs: pass method_knobs(config)")
        if (path is None) == (self.config.inversion == "direct"):
            raise ValueError("Direct Inversion's edit needs the inversion trajectory (path), and only it takes one")
        run = EditRun(self.pipe, params, self.schedule, self.layers, self.plan, self.config, path)
        return self.method.edit(run, x_T, prompts, knobs, extra_knobs, uncond)

    def _decode_impl(self, params, latents):
        self.trace_counts["decode"] += 1
        return self.pipe.decode(params, latents)

    def _stages(self, stage: Callable, params, images, keys, prompts: Prompts, knobs: Knobs, extra_knobs=None,
                rng=None, x_T=None, uncond=None) -> dict:
        """The program's order, written once: encode -> invert (null-text, direct) -> edit -> decode.
        ``stage(name, *args)`` runs one stage (inline when traced, or jitted and timed); with
        ``x_T`` given the first two are skipped (``uncond``: its null embeddings, if any)."""
        extra, path = {}, None
        if x_T is None:
            x0 = stage("encode", params, images, keys)
            if self.config.inversion == "null-text":
                nt = stage("null_text", params, x0, prompts, knobs, rng)
                x_T, uncond = nt.x_T, nt.uncond
                extra = {"null_embeddings": jnp.moveaxis(nt.uncond, 1, 0), "null_text_iterations": nt.iterations.T}
            elif self.config.inversion == "direct":
                x_T, path = stage("invert_direct", params, x0, prompts.source, rng)
            else:
                x_T = stage("invert", params, x0, prompts.source, rng)
        elif self.config.inversion == "direct":
            raise ImageError("Direct Inversion follows the whole inversion trajectory, which a saved x_T does not "
                             "hold: edit from the image (or choose another --inversion-variant)")
        out = stage("edit", params, x_T, prompts, knobs, extra_knobs, uncond, path)
        b = x_T.shape[0]
        decoded = stage("decode", params, jnp.concatenate([out["reconstruction"], out["edited"]]))
        return {"inverted": x_T, **out, **extra, "reconstruction_image": decoded[:b], "edit_image": decoded[b:]}

    # -- public -------------------------------------------------------------------------------------
    def program(self, params, images, keys, prompts: Prompts, knobs: Knobs, extra_knobs=None, rng=None) -> dict:
        """The whole edit of a batch, pure and jit-able.

        ``images`` (B, H, W, 3) in [-1, 1]; ``keys`` None (VAE posterior mean) or (B, 2) uint32 (a
        sample per image); ``knobs`` :class:`Knobs` of () or (B,) arrays; ``extra_knobs``
        :func:`method_knobs`; ``rng`` (2,) the noise regularisation's key or None. Returns a dict of
        (B, ...) arrays: inverted, reconstruction, edited, mask_raw, mask (+ the method's own),
        reconstruction_image, edit_image ([-1, 1]); with null-text inversion null_embeddings
        (B, N, 77, D) and null_text_iterations (B, N).
        """
        return self._stages(self._inline, params, images, keys, prompts, knobs, extra_knobs, rng)

    def generate_program(self, params, x_T, prompts: Prompts, knobs: Knobs, extra_knobs=None) -> dict:
        """:meth:`program` for generated sources (:mod:`csg_jax.editing.generate`): from x_T
        (B, h, w, C), CFG with ``prompts.negative`` (the empty prompt) at every step, no inversion;
        ``reconstruction_image`` is the generated source."""
        from csg_jax.editing.generate import empty_uncond

        uncond = empty_uncond(prompts, self.config.num_steps)
        return self._stages(self._inline, params, None, None, prompts, knobs, extra_knobs, None, x_T, uncond)

    def _inline(self, name: str, *args):
        """Stage ``name`` traced inline (the whole-program functions above, under one jit / shard_map)."""
        impls = {"encode": self._encode_impl, "invert": self._invert_impl, "null_text": self._null_text_impl,
                 "invert_direct": self._invert_direct_impl, "edit": self._edit_impl, "decode": self._decode_impl}
        return impls[name](*_trim(*args))

    def jitted(self, stage: str):
        """The jit-compiled ``stage`` (one of :data:`STAGES`; "program" is :meth:`program`)."""
        return self._jitted[stage]

    def lower(self, stage: str, *args):
        """``jitted(stage).lower(*args)`` (AOT compilation, memory analysis)."""
        return self._jitted[stage].lower(*_trim(*args))

    def sharded(self, key, make: Callable):
        """The owner-held cache of sharded programs (``make()`` on a miss): see csg_jax.dataset."""
        if key not in self._sharded:
            self._sharded[key] = make()
        return self._sharded[key]

    def stores_source_maps(self, batch: int) -> bool:
        """Whether an edit of ``batch`` images keeps the source pass's cross-attention maps (one UNet
        evaluation per step fewer) instead of recomputing them (CSG's :func:`csg.store_source_maps`)."""
        hook = getattr(self.method, "store_source_maps", None)
        return bool(hook and hook(self.config, self.layers, batch, self.pipe.unet.dtype))

    def unet_evaluations(self, batch: int = 1, source: str = "image") -> dict:
        """{"per_step": {phase: evaluations per image}, "total": per image} of this editor's edits;
        ``source``: where x_T comes from (:data:`costs.SOURCES`)."""
        stored = self.stores_source_maps(batch)
        return {"per_step": costs.unet_evaluations_per_step(self.config, stored, source),
                "total": costs.unet_evaluations(self.config, stored, source)}

    def _check(self, config: EditConfig):
        if config.static() != self.config:
            raise ValueError("this Editor was compiled for another static config; make a new Editor")

    def encode(self, images, sample_seed: Optional[int] = None):
        """(B, H, W, 3) in [-1, 1] -> scaled latents; posterior mean unless ``sample_seed`` is given."""
        rng = None if sample_seed is None else jax.random.PRNGKey(sample_seed)
        return self._jitted["encode"](*_trim(self.pipe.params, images, rng))

    def _rng(self, seed):
        return jax.random.PRNGKey(seed) if self.config.noise_regularization else None

    def invert(self, x0, source_ctx, seed: int = 0):
        """x_T (B, h, w, C); ``seed`` draws the rolls of the optional noise regularisation."""
        return self._jitted["invert"](*_trim(self.pipe.params, x0, source_ctx, self._rng(seed)))

    def invert_null_text(self, x0, prompts: Prompts, config: EditConfig) -> null_text.NullTextResult:
        """Standard DDIM inversion + null-text optimisation at ``config``'s guidance scale, starting
        from ``prompts.negative``: x_T, the per-step embeddings (N, B, 77, D) for :meth:`edit`, ..."""
        self._check(config)
        return self._jitted["null_text"](self.pipe.params, x0, prompts, Knobs.from_config(config),
                                         *_trim(self._rng(config.seed)))

    def invert_direct(self, x0, source_ctx, seed: int = 0):
        """Direct Inversion: (x_T, (N, B, h, w, C) the source branch's targets) for :meth:`edit`'s ``path``."""
        return self._jitted["invert_direct"](*_trim(self.pipe.params, x0, source_ctx, self._rng(seed)))

    def edit(self, x_T, prompts: Prompts, config: EditConfig, uncond=None, path=None) -> EditOutputs:
        """``uncond``: (N, B, 77, D) per-step negative embeddings from :meth:`invert_null_text`;
        ``path``: Direct Inversion's targets from :meth:`invert_direct`."""
        self._check(config)
        return self._jitted["edit"](*_trim(self.pipe.params, x_T, prompts, Knobs.from_config(config),
                                           method_knobs(config), uncond, path))

    def decode(self, latents):
        return self._jitted["decode"](self.pipe.params, latents)

    def run(self, images, prompts: Prompts, config: EditConfig, x_T=None, uncond=None,
            timings: Optional[dict] = None) -> dict:
        """:meth:`program`'s stages, each jitted (shared with :meth:`encode`, :meth:`edit`, ...)
        and timed into ``timings`` ({stage}_s): an image is encoded and inverted once, then edited."""
        self._check(config)
        keys = jax.random.PRNGKey(config.seed) if config.encode == "sample" and x_T is None else None
        timings = {} if timings is None else timings

        def stage(name, *args):
            t0 = time.perf_counter()
            out = jax.block_until_ready(self._jitted[name](*_trim(*args)))
            timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.perf_counter() - t0
            return out

        return self._stages(stage, self.pipe.params, images, keys, prompts, Knobs.from_config(config),
                            method_knobs(config), self._rng(config.seed), x_T, uncond)


def encode_items(encode, params, images, keys):
    """VAE posterior samples with one PRNG key per image: (B, H, W, 3), (B, 2) -> (B, h, w, C).

    Image i gets exactly the noise ``encode(params, images[i:i+1], keys[i])`` draws for it alone
    (the single-image CLI with that item's seed), whatever the batch around it."""
    return jax.vmap(lambda im, k: encode(params, im[None], k)[0])(images, keys)


def _trim(*args):
    """Arguments without trailing Nones: a call then hits the same jit cache entry as one that
    leaves those optional arguments out (e.g. ``editor.lower("edit", params, x_T, prompts, knobs)``)."""
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return args


_EDITORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pipeline -> {(static config, hw): Editor}


def get_editor(pipe, config: EditConfig, latent_hw) -> Editor:
    """The :class:`Editor` per (pipeline, static config, latent size), held as long as the pipeline."""
    editors = _EDITORS.setdefault(pipe, {})
    key = (config.static(), tuple(latent_hw))
    if key not in editors:
        editors[key] = Editor(pipe, config, latent_hw)
    return editors[key]


@dataclasses.dataclass
class EditResult:
    """Outputs of :func:`translate_image` (numpy; images (H, W, 3) in [0, 1], masks (h, w))."""

    plan: PromptPlan
    inverted: np.ndarray  # x_T, (h, w, C)
    reconstruction_latent: np.ndarray
    edited_latent: np.ndarray
    mask_raw: np.ndarray
    mask: np.ndarray
    source_image: Optional[np.ndarray]
    reconstruction: np.ndarray
    edit: np.ndarray
    timings: dict
    null_embeddings: Optional[np.ndarray] = None  # (N, 77, D) per-step negative embeddings (null-text)
    null_text_iterations: Optional[np.ndarray] = None  # (N,) Adam steps per timestep
    unet_evaluations: Optional[dict] = None  # Editor.unet_evaluations: {"per_step": {...}, "total": n}


def image_multiple(pipe) -> int:
    """Image sides must be multiples of this (VAE factor x UNet downsampling)."""
    return pipe.downsample * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) or float in [0, 1] -> float32 in [-1, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImageError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return (image.astype(np.float32) * 2.0 - 1.0)


def to_unit_range(images) -> np.ndarray:
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def translate_image(pipe, image=None, prompt: str = "", task: Optional[str] = None, target_prompt: Optional[str] = None,
                    config: EditConfig = EditConfig(), inverted: Optional[np.ndarray] = None,
                    source_word: Optional[str] = None, null_embeddings: Optional[np.ndarray] = None,
                    uncond_fn: Optional[Callable] = None) -> EditResult:
    """Edit one image (or an already inverted latent x_T) from ``prompt`` toward ``task``/``target_prompt``.

    With ``config.inversion == "null-text"``, an already inverted latent needs the
    ``null_embeddings`` (N, 77, D) saved with it. ``uncond_fn(prompts) -> (N, 1, 77, D)``: per-step
    negative contexts for an x_T edit (:mod:`csg_jax.editing.generate`).
    """
    plan = plan_prompts(pipe, prompt, task, target_prompt, source_word, config.negative_prompt)
    x, x_T, uncond = None, None, None
    if inverted is None:
        if image is None:
            raise ImageError("give an image or an inverted latent")
        x = to_model_range(image)[None]
        m = image_multiple(pipe)
        if x.shape[1] % m or x.shape[2] % m:
            raise ImageError(f"image sides must be multiples of {m}; got {x.shape[1]}x{x.shape[2]}")
        latent_hw = (x.shape[1] // pipe.downsample, x.shape[2] // pipe.downsample)
    else:
        inverted = np.asarray(inverted, np.float32)
        latent_hw = inverted.shape[-3:-1]
        x_T = jnp.asarray(inverted.reshape(1, *inverted.shape[-3:]))
    editor = get_editor(pipe, config, latent_hw)
    prompts = prepare_prompts(pipe, [plan], config)
    if inverted is not None and config.inversion == "null-text":
        if null_embeddings is None:
            raise ImageError("null-text inversion: an inverted latent needs its null embeddings "
                             "(null_embeddings.npy, written next to inversion.npy)")
        uncond = jnp.asarray(np.asarray(null_embeddings, np.float32).reshape(-1, 1, *prompts.source.shape[1:]))
        if uncond.shape[0] != config.num_steps:
            raise ImageError(f"the null embeddings hold {uncond.shape[0]} steps, the edit has {config.num_steps}")
    if inverted is not None and uncond_fn is not None:
        uncond = uncond_fn(prompts)
    stage_s: dict = {}
    out = editor.run(None if x is None else jnp.asarray(x), prompts, config, x_T, uncond, stage_s)
    timings = {"invert_s": sum(stage_s.get(k, 0.0) for k in ("encode_s", "invert_s", "null_text_s", "invert_direct_s")),
               "edit_s": stage_s["edit_s"], "decode_s": stage_s["decode_s"]}
    one = lambda k: np.asarray(out[k][0])
    return EditResult(
        plan=plan,
        inverted=one("inverted"),
        reconstruction_latent=one("reconstruction"),
        edited_latent=one("edited"),
        mask_raw=one("mask_raw"),
        mask=one("mask"),
        source_image=None if image is None else to_unit_range(to_model_range(image)),
        reconstruction=to_unit_range(out["reconstruction_image"])[0],
        edit=to_unit_range(out["edit_image"])[0],
        timings=timings,
        null_embeddings=one("null_embeddings") if "null_embeddings" in out else (
            None if uncond is None else np.asarray(uncond[:, 0])),
        null_text_iterations=one("null_text_iterations") if "null_text_iterations" in out else None,
        unet_evaluations=editor.unet_evaluations(
            1, "image" if inverted is None else "generated" if uncond_fn is not None else "inverted"),
    )
