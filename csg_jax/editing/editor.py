"""The editing API: prompts -> batched conditioning, and jit-compiled invert / edit functions.

``translate_image(pipe, image, prompt, task=... | target_prompt=..., config=EditConfig())``
is the one-call entry point; :class:`Editor` keeps the compiled functions for a model, a
latent size and the static part of a config, so that an image is inverted once and edited
for many tasks (``editor.invert`` then ``editor.edit``) without recompiling.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax import prompts as P
from csg_jax.editing import csg, null_text, p2p, p2p_align, pix2pix_zero
from csg_jax.editing.config import EditConfig
from csg_jax.errors import ImageError, PromptError
from csg_jax.schedule import make_schedule


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """Everything about one image's prompts, in plain Python (goes into meta.json)."""

    source_prompt: str
    target_prompt: str
    negative_prompt: str
    source_word: str
    target_words: str
    source_span: tuple[int, int]  # token positions [start, end), BOS = 0
    target_span: tuple[int, int]
    ref_columns: tuple[int, ...]  # (77,) source column for each target column
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ref_columns_changed"] = {i: c for i, c in enumerate(self.ref_columns) if c != i}
        del d["ref_columns"]
        return d


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else 0


def _word_states_fn(pipe):
    """Embeds single words: mean final text-encoder state over the word's tokens."""

    def embed(words: list[str]) -> np.ndarray:
        states = np.asarray(pipe.embed(list(words)))
        out = []
        for w, s in zip(words, states):
            n = max(1, _token_count(pipe.tokenizer, w))
            out.append(s[1 : 1 + n].mean(0))
        return np.stack(out)

    return embed


def plan_prompts(pipe, source_prompt: str, task: Optional[str] = None, target_prompt: Optional[str] = None,
                 source_word: Optional[str] = None, negative: str = "source") -> PromptPlan:
    """Build the target prompt (from a task) and locate the source word's and target words' tokens."""
    tok = pipe.tokenizer
    warnings = []
    source_prompt, warn = P.check_length(tok, " ".join(source_prompt.split()), pipe.max_length)
    if warn:
        warnings.append(warn)
    if not source_prompt:
        raise PromptError("The source prompt is empty; describe the image, e.g. 'a photo of a cat'.")
    if (task is None) == (target_prompt is None):
        raise PromptError("Give exactly one of a task (e.g. 'cat2dog') or a target prompt.")
    if task is not None:
        word, target_words = P.parse_task(task)
        similar = lambda candidates, w: P.most_similar_word(candidates, w, _word_states_fn(pipe))
        target_prompt, replaced = P.build_target_prompt(source_prompt, task, similar_word_fn=similar)
        if replaced.lower() != word.lower():
            warnings.append(f"'{word}' is not in the source prompt; editing the most similar word '{replaced}' instead.")
        source_word, target_text = replaced, " ".join(target_words)
    else:
        target_prompt, warn = P.check_length(tok, " ".join(target_prompt.split()), pipe.max_length)
        if warn:
            warnings.append(warn)
        source_word, target_text = _diff_words(source_prompt, target_prompt, source_word)
    match = re.search(rf"(?<![^\W\d_]){re.escape(source_word)}(?![^\W\d_])", source_prompt, re.IGNORECASE)
    if match is None:
        raise PromptError(f"The word {source_word!r} does not appear in the source prompt {source_prompt!r}.")
    prefix = source_prompt[: match.start()]
    start = 1 + _token_count(tok, prefix)
    source_span = (start, start + _token_count(tok, match.group(0)))
    target_span = (start, start + max(1, _token_count(tok, target_text)))
    limit = pipe.max_length - 1
    if source_span[1] > limit or target_span[1] > limit:
        raise PromptError(f"The edited word lies beyond the {limit - 1} tokens the text encoder sees; shorten the prompt.")

    states = np.asarray(pipe.embed([source_prompt, target_prompt]))
    n_src = _token_count(tok, source_prompt)
    n_tgt = _token_count(tok, target_prompt)
    ref = P.match_tokens(states[0], states[1], n_src, n_tgt, forced=(target_span, source_span[0]))
    neg = source_prompt if negative == "source" else ""
    return PromptPlan(source_prompt, target_prompt, neg, source_word, target_text, source_span, target_span,
                      tuple(int(c) for c in ref), tuple(warnings))


def _diff_words(source_prompt: str, target_prompt: str, source_word: Optional[str]) -> tuple[str, str]:
    """(source word, target text) for a directly given target prompt: the first differing word."""
    s, t = source_prompt.split(), target_prompt.split()
    if source_word is not None:
        return source_word, source_word
    for i, (a, b) in enumerate(zip(s, t)):
        if a.lower() != b.lower():
            j = len(t) - (len(s) - i) if len(t) >= len(s) else i
            return re.sub(r"[^\w]", "", a) or a, " ".join(t[i : max(i + 1, j + 1)])
    if len(t) > len(s):
        return s[-1], " ".join(t[len(s) - 1 :])
    raise PromptError(
        "The target prompt is the source prompt: nothing marks the word to edit. Give a different target "
        "prompt, a task such as 'cat2dog', or name the word with source_word / --source-word."
    )


def _span_arrays(spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token spans -> (B, K) int32 positions (padded with the first) and (B, K) weights 1/len (0 on padding)."""
    k = max(end - start for start, end in spans)
    cols = np.zeros((len(spans), k), np.int32)
    wts = np.zeros((len(spans), k), np.float32)
    for i, (start, end) in enumerate(spans):
        span = list(range(start, end))
        cols[i, : len(span)] = span
        cols[i, len(span):] = span[0]
        wts[i, : len(span)] = 1.0 / len(span)
    return cols, wts


def word_spans(tokenizer, prompt: str, words: str) -> list[tuple[int, int]]:
    """Token spans [start, end) (BOS = 0) of each occurrence of each whitespace-separated word of
    ``words`` in ``prompt``; PromptError if a word does not occur."""
    spans = []
    for word in words.split():
        found = False
        for match in re.finditer(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", prompt, re.IGNORECASE):
            start = 1 + _token_count(tokenizer, prompt[: match.start()])
            spans.append((start, start + _token_count(tokenizer, match.group(0))))
            found = True
        if not found:
            raise PromptError(f"The equalizer word {word!r} does not appear in the target prompt {prompt!r}.")
    return spans


def _blend_columns(tokenizer, plan: PromptPlan, width: int) -> np.ndarray:
    """(2, width) LocalBlend word columns as the released ``LocalBlend`` builds them (every token of
    every occurrence, ``get_word_inds``); a word it cannot find (punctuation attached, say) falls back
    to its span, where the released code would divide by a zero map."""
    out = np.zeros((2, width), np.float32)
    for row, (prompt, words, span) in enumerate(((plan.source_prompt, plan.source_word, plan.source_span),
                                                  (plan.target_prompt, plan.target_words, plan.target_span))):
        idx = [i for word in words.split() for i in p2p_align.word_token_indices(tokenizer, prompt, word)]
        idx = [i for i in idx if i < width] or list(range(span[0], min(span[1], width)))
        out[row, idx] = 1.0
    return out


def batch_prompts(pipe, plans: Sequence[PromptPlan], equalizer_words: Optional[str] = None,
                  token_alignment: str = "released") -> csg.Prompts:
    """Stack per-image prompt plans into one :class:`csg.Prompts` batch.

    ``equalizer_words``: words of the target prompts whose cross-attention columns Prompt-to-Prompt's
    equalizer re-weights (default: the target words). ``token_alignment``: Prompt-to-Prompt's
    column mapping, "released" (:func:`p2p_align.align`) or "similarity" (``ref_columns``).
    """
    texts = [p.source_prompt for p in plans] + [p.negative_prompt for p in plans] + [p.target_prompt for p in plans]
    states = pipe.embed(texts)
    b = len(plans)
    cols, wts = _span_arrays([p.source_span for p in plans])
    target = np.zeros((b, pipe.max_length), np.float32)
    reweight = np.zeros((b, pipe.max_length), np.float32)
    for i, p in enumerate(plans):
        start, end = p.target_span
        target[i, start:end] = 1.0 / (end - start)
        spans = [p.target_span] if equalizer_words is None else word_spans(pipe.tokenizer, p.target_prompt, equalizer_words)
        for start, end in spans:
            reweight[i, start : min(end, pipe.max_length)] = 1.0
    ref = np.asarray([p.ref_columns for p in plans], np.int32)
    n = pipe.max_length
    if token_alignment == "released":
        aligned = [p2p_align.align(pipe.tokenizer, p.source_prompt, p.target_prompt, n) for p in plans]
    else:
        aligned = [p2p_align.similarity_alignment(p.ref_columns, n) for p in plans]
    blend = np.stack([_blend_columns(pipe.tokenizer, p, n) for p in plans])
    return csg.Prompts(states[:b], states[b : 2 * b], states[2 * b :], jnp.asarray(cols), jnp.asarray(wts), jnp.asarray(ref),
                       jnp.asarray(target), jnp.asarray(reweight), jnp.asarray(np.stack([a.matrix for a in aligned])),
                       jnp.asarray(np.stack([a.keep for a in aligned])), jnp.asarray(blend))


def static_config(config: EditConfig) -> EditConfig:
    """The part of a config that shapes the compiled program (floats and seeds travel as arrays)."""
    return config.replace(guidance_scale=0.0, posterior_guidance=0.0, delta=1.0, seed=0, negative_prompt="source",
                          encode="mean", cross_replace_steps=0.0, self_replace_steps=0.0, blend_threshold=0.0,
                          blend_start=0.0, equalizer_words=None, equalizer_scale=1.0, xa_guidance=0.0,
                          source_sentences=None, target_sentences=None)


def method_knobs(config: EditConfig):
    """The method's own array-valued settings (None for CSG and DDIM)."""
    if config.method == "p2p":
        return p2p.Knobs.from_config(config)
    if config.method == "pix2pix-zero":
        return pix2pix_zero.Knobs.from_config(config)
    return None


class EditOutputs(dict):
    """dict of arrays: x0, inverted, reconstruction, edited (latents), mask_raw, mask."""


class Editor:
    """Compiled invert / edit functions for one pipeline, latent size and static config.

    ``trace_counts`` counts how often each function was traced (= compiled), so callers and
    tests can check that repeated calls with equal shapes reuse the compiled program.
    """

    def __init__(self, pipe, config: EditConfig, latent_hw: tuple[int, int]):
        self.pipe = pipe
        self.config = static_config(config)
        self.latent_hw = tuple(latent_hw)
        self.schedule = make_schedule(pipe.scheduler_config, config.num_steps)
        mask_res = config.mask_res or pipe.defaults.get("mask_res") or config.mask_resolution(self.latent_hw)
        self.layers = csg.plan_layers(pipe.unet.config, self.latent_hw, int(mask_res))
        self.p2p_layers = p2p.plan_layers(pipe.unet.config, self.latent_hw, self.layers, self.config)
        self.trace_counts = {"encode": 0, "invert": 0, "edit": 0, "decode": 0, "null_text": 0}
        self._encode = jax.jit(self._encode_impl)
        self._invert = jax.jit(self._invert_impl)
        self._null_text = jax.jit(self._null_text_impl)
        self._edit = jax.jit(self._edit_impl)
        self._decode = jax.jit(self._decode_impl)

    # -- traced bodies ------------------------------------------------------------------------
    def _encode_impl(self, params, images, rng):
        self.trace_counts["encode"] += 1
        return self.pipe.encode(params, images, rng)

    def _noise_fn(self, rng):
        if not self.config.noise_regularization:
            return None
        return pix2pix_zero.noise_regularizer(jax.random.PRNGKey(0) if rng is None else rng)

    def _invert_impl(self, params, x0, source_ctx, rng=None):
        self.trace_counts["invert"] += 1
        variant = "official" if self.config.inversion == "official" else "standard"
        if self.config.noise_regularization:
            return null_text.ddim_inversion(self.pipe, params, x0, source_ctx, self.schedule, variant, self._noise_fn(rng))[0]
        return csg.invert(self.pipe, params, x0, source_ctx, self.schedule, variant)

    def _null_text_impl(self, params, x0, prompts: csg.Prompts, knobs: csg.Knobs, rng=None):
        self.trace_counts["null_text"] += 1
        return null_text.null_text_inversion(self.pipe, params, x0, prompts.source, prompts.negative, self.schedule,
                                             knobs.guidance_scale, int(self.config.null_text_steps), self._noise_fn(rng))

    def _edit_impl(self, params, x_T, prompts: csg.Prompts, knobs: csg.Knobs, extra_knobs=None, uncond=None):
        """``extra_knobs``: :func:`method_knobs`; ``uncond``: (N, B, 77, D) null-text embeddings or None."""
        self.trace_counts["edit"] += 1
        method = self.config.method
        if method in ("p2p", "pix2pix-zero") and extra_knobs is None:
            raise ValueError(f"method {method!r} needs its knobs: pass editor.method_knobs(config) as extra_knobs")
        if method == "p2p":
            return p2p.edit(self.pipe, params, x_T, prompts, self.schedule, self.p2p_layers, self.config, knobs,
                            extra_knobs, uncond)
        keep = method == "csg" and self.stores_source_maps(x_T.shape[0])
        source = csg.source_pass(self.pipe, params, x_T, prompts, self.schedule, self.layers, uncond, knobs.guidance_scale,
                                 keep_maps=keep)
        if method == "pix2pix-zero":
            edited = pix2pix_zero.target_pass(self.pipe, params, x_T, prompts, source, self.schedule, self.layers, knobs,
                                              extra_knobs, uncond)
        else:
            edited = csg.target_pass(self.pipe, params, x_T, prompts, source, self.schedule, self.layers, self.config,
                                     knobs, uncond)
        return {"reconstruction": source.reconstruction, "edited": edited, "mask_raw": source.mask_raw, "mask": source.mask}

    def _decode_impl(self, params, latents):
        self.trace_counts["decode"] += 1
        return self.pipe.decode(params, latents)

    # -- public -----------------------------------------------------------------------------------
    def stores_source_maps(self, batch: int) -> bool:
        """Whether an edit of ``batch`` images keeps the source pass's cross-attention maps (one UNet
        evaluation per step fewer) instead of recomputing them: :func:`csg.store_source_maps`."""
        return csg.store_source_maps(self.config, self.layers, batch, self.pipe.unet.dtype)

    def unet_evaluations(self, batch: int = 1) -> dict:
        """{"per_step": {phase: evaluations per image}, "total": per image} of this editor's edits."""
        stored = self.stores_source_maps(batch)
        return {"per_step": csg.unet_evaluations_per_step(self.config, stored),
                "total": csg.unet_evaluations(self.config, stored)}

    def encode(self, images, sample_seed: Optional[int] = None):
        """(B, H, W, 3) in [-1, 1] -> scaled latents; posterior mean unless ``sample_seed`` is given."""
        rng = None if sample_seed is None else jax.random.PRNGKey(sample_seed)
        return self._encode(self.pipe.params, images, rng)  # None is an empty pytree: its own compilation

    def _rng(self, seed):
        return jax.random.PRNGKey(seed) if self.config.noise_regularization else None

    def invert(self, x0, source_ctx, seed: int = 0):
        """x_T (B, h, w, C); ``seed`` draws the rolls of the optional noise regularisation."""
        return self._invert(*_trim(self.pipe.params, x0, source_ctx, self._rng(seed)))

    def invert_null_text(self, x0, prompts: csg.Prompts, config: EditConfig) -> null_text.NullTextResult:
        """Standard DDIM inversion + null-text optimisation at ``config``'s guidance scale, starting
        from ``prompts.negative``: x_T, the per-step embeddings (N, B, 77, D) for :meth:`edit`, ..."""
        if static_config(config) != self.config:
            raise ValueError("this Editor was compiled for another static config; make a new Editor")
        return self._null_text(self.pipe.params, x0, prompts, csg.Knobs.from_config(config), self._rng(config.seed))

    def edit(self, x_T, prompts: csg.Prompts, config: EditConfig, uncond=None) -> dict:
        """``uncond``: (N, B, 77, D) per-step negative embeddings from :meth:`invert_null_text`."""
        if static_config(config) != self.config:
            raise ValueError("this Editor was compiled for another static config; make a new Editor")
        return self._edit(*_trim(self.pipe.params, x_T, prompts, csg.Knobs.from_config(config), method_knobs(config),
                                 uncond))

    def decode(self, latents):
        return self._decode(self.pipe.params, latents)


def _trim(*args):
    """Arguments without trailing Nones: a call then hits the same jit cache entry as one that
    leaves those optional arguments out (e.g. ``editor._edit.lower(params, x_T, prompts, knobs)``)."""
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return args


_EDITORS: dict = {}


def get_editor(pipe, config: EditConfig, latent_hw) -> Editor:
    """A cached :class:`Editor` per (pipeline, static config, latent size)."""
    key = (id(pipe), static_config(config), tuple(latent_hw))
    if key not in _EDITORS:
        _EDITORS[key] = Editor(pipe, config, latent_hw)
    return _EDITORS[key]


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
                    source_word: Optional[str] = None, null_embeddings: Optional[np.ndarray] = None) -> EditResult:
    """Edit one image (or an already inverted latent x_T) from ``prompt`` toward ``task``/``target_prompt``.

    With ``config.inversion == "null-text"``, an already inverted latent needs the
    ``null_embeddings`` (N, 77, D) saved with it.
    """
    timings = {}
    plan = plan_prompts(pipe, prompt, task, target_prompt, source_word, config.negative_prompt)
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
    editor = get_editor(pipe, config, latent_hw)
    prompts = batch_prompts(pipe, [plan], config.equalizer_words, config.token_alignment)
    if config.method == "pix2pix-zero":
        prompts = pix2pix_zero.edit_context(pipe, prompts, config)
    uncond, iterations = None, None
    t0 = time.perf_counter()
    if inverted is None:
        x0 = editor.encode(jnp.asarray(x), config.seed if config.encode == "sample" else None)
        if config.inversion == "null-text":
            nt = jax.block_until_ready(editor.invert_null_text(x0, prompts, config))
            x_T, uncond, iterations = nt.x_T, nt.uncond, np.asarray(nt.iterations[:, 0])
        else:
            x_T = jax.block_until_ready(editor.invert(x0, prompts.source, config.seed))
    else:
        x_T = jnp.asarray(inverted.reshape(1, *inverted.shape[-3:]))
        if config.inversion == "null-text":
            if null_embeddings is None:
                raise ImageError("null-text inversion: an inverted latent needs its null embeddings "
                                 "(null_embeddings.npy, written next to inversion.npy)")
            uncond = jnp.asarray(np.asarray(null_embeddings, np.float32).reshape(-1, 1, *prompts.source.shape[1:]))
            if uncond.shape[0] != config.num_steps:
                raise ImageError(f"the null embeddings hold {uncond.shape[0]} steps, the edit has {config.num_steps}")
    timings["invert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(editor.edit(x_T, prompts, config, uncond))
    timings["edit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = editor.decode(jnp.concatenate([out["reconstruction"], out["edited"]]))
    decoded = to_unit_range(decoded)
    timings["decode_s"] = time.perf_counter() - t0
    return EditResult(
        plan=plan,
        inverted=np.asarray(x_T[0]),
        reconstruction_latent=np.asarray(out["reconstruction"][0]),
        edited_latent=np.asarray(out["edited"][0]),
        mask_raw=np.asarray(out["mask_raw"][0]),
        mask=np.asarray(out["mask"][0]),
        source_image=None if image is None else to_unit_range(to_model_range(image)),
        reconstruction=decoded[0],
        edit=decoded[1],
        timings=timings,
        null_embeddings=None if uncond is None else np.asarray(uncond[:, 0]),
        null_text_iterations=iterations,
        unet_evaluations=editor.unet_evaluations(1),
    )
