"""Train a small Stable-Diffusion-shaped text-to-image model on the shapes world, in pixel space.

The model is the real thing in miniature: our :class:`~csg_jax.models.unet.UNet2DConditionModel`
and :class:`~csg_jax.models.clip_text.CLIPTextModel`, trained jointly from scratch, exported in
the diffusers on-disk format with ``model_index.json`` declaring ``"csg_jax": {"kind": "pixel"}``
(no VAE: the "latent" is the 32x32 RGB image in [-1, 1] times ``scaling_factor``), so
:func:`csg_jax.pipeline.load_pipeline` and the CSG editor load it like any SD checkpoint.

Choices that made a prototype follow the caption (with raw [-1, 1] pixels, SD betas and epsilon
prediction it ignored the text):

* no leak of the image at the last timestep: first SD's betas with images scaled by 0.18215 like
  SD latents, now (the default) the cosine schedule on [-1, 1] images, which also keeps enough
  signal at most timesteps for the shapes to be learned (see RECIPES);
* v-prediction;
* the text encoder's token embeddings start with std 1 (not Flax's default 1/sqrt(64));
* classifier-free-guidance dropout: the caption is replaced by "" with probability 0.1.

Data: a pool of ``pool_size`` scenes is rendered once (numpy, in worker processes, overlapped
with compilation), kept on the device as uint8, and each step draws a batch from it on device.
Captions come from a fixed set of 280, tokenized once into a table; each pool image stores its
row. Nothing crosses the host-device boundary per step.

Entry point: :func:`train` (``scripts/train_shapes.py`` is its CLI).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np

from csg_jax.shapes import world
from csg_jax.tokenizer_files import DEFAULT_WORDS, build_vocab_and_merges, write_clip_tokenizer

# (beta_schedule, scaling_factor) of the two recipes we trained. "sd_latent" copies SD: its
# scaled-linear betas and the 0.18215 latent scale. On raw pixels (std 0.73) that leaves a
# per-pixel log10 SNR below 0 for every t > 30 and below -2 for half of them, so nearly all the
# training signal is about colours and placement, and outlines (the shape) are learned at about
# a point of accuracy per 1,000 steps. "pixel_cosine" is the usual pixel-space choice (Nichol &
# Dhariwal's cosine betas on [-1, 1] images): log10 SNR from +3.8 (t = 1) to -3.4 (t = 981),
# half of the steps above -0.3, and at the last sampling step less signal left (0.03 x0) than
# SD's 0.068, so the model still has to read the caption.
RECIPES = {"pixel_cosine": ("squaredcos_cap_v2", 1.0), "sd_latent": ("scaled_linear", 0.18215)}
DEFAULT_RECIPE = "pixel_cosine"
LEGACY_RECIPE = RECIPES["sd_latent"]  # of checkpoints saved before the recipe was recorded
SCALING_FACTOR = RECIPES[DEFAULT_RECIPE][1]  # 1.0: images in [-1, 1] are the "latents" as they are
IMAGE_SIZE = 32
EMPTY_ROW = 0  # row of "" in the caption table (the unconditional caption)
LOC_WORDS = ("color", "shape")  # caption attributes whose words the localisation term grounds
CHUNK = 256  # scenes rendered per worker task


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved with each checkpoint)."""

    batch_size: int = 32
    steps: int = 30000  # most steps to train; also the LR schedule's horizon unless fitted to the budget
    pool_size: int = 100_000
    seed: int = 0
    lr: float = 3e-4
    warmup_steps: int = 500
    final_lr_fraction: float = 0.1  # cosine decays to lr * this at the horizon
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # classifier-free-guidance caption dropout
    t_focus: float = 0.0  # share of timesteps drawn from [t_focus_min, t_focus_max) instead of [0, T) (see sample_timesteps)
    t_focus_max: int = 400
    t_focus_min: int = 0
    token_embed_std: float = 1.0
    # Loss weight of the pixels near the object's outline: 1 + edge_weight there, 1 elsewhere (see
    # edge_bands). 0 is the plain MSE all runs before Nov 27 2026 used.
    edge_weight: float = 0.0
    edge_width: int = 2  # half-thickness of that band, in pixels
    # Weight of the word-localisation term (see localisation_loss): pulls the cross-attention of
    # the object-colour and shape words into the object's ground-truth mask. 0 (off) is what all
    # runs before Nov 28 2026 used. Only images with t < loc_t_max count (above it the object's
    # place cannot be read off x_t).
    loc_weight: float = 0.0
    loc_t_max: int = 900
    # Noise schedule and image scale (see RECIPES). The first runs used SD's ("sd_latent");
    # checkpoints saved without these fields were trained with it.
    beta_schedule: str = RECIPES[DEFAULT_RECIPE][0]
    scaling_factor: float = RECIPES[DEFAULT_RECIPE][1]
    dtype: str = "float32"  # activation dtype: float32 or bfloat16 (params and loss stay float32)
    remat: str = "auto"  # rematerialisation: auto | off | attention | full (see REMAT_MODES)


def shapes_words() -> list[str]:
    """Tokenizer words: every shapes-world word (one token each) plus the default demo words."""
    return sorted(set(world.VOCABULARY) | set(DEFAULT_WORDS))


def model_configs(vocab_size: Optional[int] = None, beta_schedule: str = RECIPES[DEFAULT_RECIPE][0]) -> dict:
    """config.json contents of each component (diffusers / transformers field names)."""
    if vocab_size is None:
        vocab_size = len(build_vocab_and_merges(shapes_words())[0])
    unet = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 64],
        # Attention at 16x16 and 8x8 only (none at 32x32): 32x32 self-attention maps cost more than
        # the rest of the UNet on a CPU, and 16x16 is the resolution the CSG mask is read at.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 4,  # diffusers quirk: this is the number of heads
        "cross_attention_dim": 64,
        "use_linear_projection": False,
        "upcast_attention": False,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "sample_size": IMAGE_SIZE,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab_size),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 64,
    }
    scheduler = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": beta_schedule,  # beta_start/end are ignored by the cosine schedule
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "v_prediction",
    }
    return {"unet": unet, "text_encoder": text, "scheduler": scheduler}


# --------------------------------------------------------------------------------------
# Data: scene pool (worker processes) and caption table
# --------------------------------------------------------------------------------------


def chunk_seed(seed: int, index: int) -> int:
    """Seed of pool chunk ``index``: distinct per (seed, index), independent of the worker count."""
    return seed * 1_000_003 + index


def render_chunk(task: tuple[int, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Worker: (seed, n) -> (images uint8 (n, 32, 32, 3), captions, masks bool (n, 32, 32)).
    Numpy only (runs in a spawned process, which must not need JAX)."""
    seed, n = task
    batch = world.make_batch(seed, n, size=IMAGE_SIZE, split="train")
    return batch["images"], batch["captions"], batch["masks"]


class PoolJob:
    """Renders the scene pool in the background (spawned worker processes) while the caller
    compiles; :meth:`result` waits and returns ``(images (N, 32, 32, 3) uint8, captions,
    masks (N, 32, 32) bool)``.

    Spawn, not fork: the parent has JAX's threads running and a forked child could deadlock.
    """

    def __init__(self, size: int, seed: int, workers: Optional[int] = None, chunk: int = CHUNK):
        self.size = int(size)
        self.tasks = _chunk_tasks(self.size, chunk_seed(seed, 0), chunk)
        if workers is None:  # one core is left to the compiler; containers may show the host's count
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
            workers = min(cores, 32) - 1
        self.workers = max(1, min(int(workers), len(self.tasks)))
        self.start = time.perf_counter()
        self._pool = None
        self._async = None
        try:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers)
            self._async = self._pool.map_async(render_chunk, self.tasks, chunksize=1,
                                               callback=self._finished)
        except Exception as e:  # no processes (sandbox): render in this process in result()
            print(f"[pool] worker processes unavailable ({e}); rendering in-process", flush=True)
            self._pool = None
        self.seconds: Optional[float] = None  # start to last scene rendered (not to result())

    def _finished(self, _):
        self.seconds = time.perf_counter() - self.start

    def result(self, timeout: Optional[float] = None, fallback: int = 8192) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The pool. If the workers failed, could not start or are not done within ``timeout``
        seconds (a worker killed by the OS leaves its task undone forever), ``fallback`` scenes are
        rendered here and repeated to the full size: the shape the step was compiled for."""
        parts = None
        if self._pool is not None:
            try:
                parts = self._async.get(timeout)
            except Exception as e:
                print(f"[pool] WARNING: worker processes failed ({type(e).__name__}: {e}); rendering "
                      f"{min(fallback, self.size)} scenes in-process and repeating them", flush=True)
            finally:
                self._pool.terminate()  # done or given up: no stragglers
                self._pool.join()
        if parts is None:
            n = min(fallback, self.size)
            parts = [render_chunk(t) for t in _chunk_tasks(n, self.tasks[0][0], CHUNK)]
        images = np.concatenate([p[0] for p in parts])
        captions = [c for p in parts for c in p[1]]
        masks = np.concatenate([p[2] for p in parts])
        if len(images) < self.size:
            reps = np.arange(self.size) % len(images)
            images, captions, masks = images[reps], [captions[i] for i in reps], masks[reps]
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        return images, captions, masks


def _chunk_tasks(size: int, first_seed: int, chunk: int) -> list[tuple[int, int]]:
    """(seed, n) worker tasks covering ``size`` scenes; seeds count up from ``first_seed``."""
    return [(first_seed + i, min(chunk, size - i * chunk)) for i in range(math.ceil(size / chunk))]


def all_captions() -> list[str]:
    """"" (row 0) then every caption the world can produce (5 shapes x 8 colours x 7 backgrounds)."""
    out = [""]
    for shape in world.SHAPES:
        for color in world.COLOR_NAMES:
            for bg in world.COLOR_NAMES:
                if bg != color:
                    out.append(world.caption(world.Scene(shape, color, bg, 0.5, 0.5, 0.3, 0.0, (0.0, 0.0), 0)))
    return out


def edge_bands(masks: np.ndarray, width: int) -> np.ndarray:
    """(N, 32, 32) uint8: 1 within ``width`` pixels of each object's outline (see
    :func:`csg_jax.shapes.world.boundary_band`), else 0. Stored with the pool, weighted by the step.

    Why weight them: a model that ignores the shape word and paints a blob of the right colour
    only errs near the outline (at width 2 about a quarter of a world image's pixels), and most
    of the MSE is the texture and noise nobody can predict. After 5,325 uniform steps the samples
    were blobs of the right colour (shape accuracy 0.315) and 1,100 of those steps had not moved
    it; 1,081 steps continued with ``edge_weight`` 4 moved it to 0.405 (same 200 held-out
    captions, 29 gained and 11 lost).
    """
    return world.boundary_band(masks, width).astype(np.uint8)


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, captions: list[str], max_length: int = 77) -> np.ndarray:
    """(K, 77) int32 ids, padded / truncated exactly like :meth:`csg_jax.pipeline.Pipeline.tokenize`."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def word_columns(tokenizer, table_captions: list[str], attributes: tuple = LOC_WORDS) -> np.ndarray:
    """(K, len(attributes)) int32: token column (BOS = 0) of each attribute's word ("red",
    "circle" ...) in each caption-table row; 0 for the empty row."""
    from csg_jax.editing.editor import word_spans

    out = np.zeros((len(table_captions), len(attributes)), np.int32)
    for row, text in enumerate(table_captions):
        if not text:
            continue
        parsed = world.parse_caption(text)
        for j, attribute in enumerate(attributes):
            (start, end), *_ = word_spans(tokenizer, text, parsed[attribute])
            if end - start != 1:
                raise ValueError(f"{parsed[attribute]!r} is not one token in {text!r}")
            out[row, j] = start
    return out


def caption_rows(captions: list[str], table_captions: list[str]) -> np.ndarray:
    """Row of each caption in the caption table, (N,) int32."""
    index = {c: i for i, c in enumerate(table_captions)}
    try:
        return np.array([index[c] for c in captions], np.int32)
    except KeyError as e:
        raise ValueError(f"caption {e} is not in the caption table") from None


# --------------------------------------------------------------------------------------
# Model, optimizer, state
# --------------------------------------------------------------------------------------


def build_models(configs: dict, dtype: str = "float32"):
    """(unet, text_encoder) Flax modules; ``dtype`` is the activation dtype, params stay fp32."""
    import jax.numpy as jnp

    from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from csg_jax.models.unet import UNet2DConditionModel, UNetConfig

    act = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), dtype=act)
    text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]), dtype=act)
    return unet, text


def param_shapes(unet, text) -> dict:
    """Abstract params ``{"unet", "text_encoder"}`` (shapes only: tracing, no computation)."""
    import jax
    import jax.numpy as jnp

    c = unet.config
    key = jax.random.key(0)
    unet_shapes = jax.eval_shape(unet.init, key, jnp.zeros((1, 8, 8, c.in_channels)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1, 77, c.cross_attention_dim)))["params"]
    text_shapes = jax.eval_shape(text.init, key, jnp.zeros((1, 77), jnp.int32))["params"]
    return {"unet": unet_shapes, "text_encoder": text_shapes}


def init_params(unet, text, seed: int, token_embed_std: float = 1.0) -> dict:
    """Fresh float32 params ``{"unet", "text_encoder"}`` as numpy arrays, drawn with numpy.

    Same distributions as Flax's defaults (kernels: LeCun truncated normal over fan-in; biases 0;
    norm scales 1; embeddings: normal with std 1/sqrt(features)), except the text encoder's token
    embedding, std ``token_embed_std``. Why not ``module.init``: run eagerly it compiles hundreds
    of small kernels (minutes on a busy CPU, ptxas per op on a GPU), and jit-compiled its
    threefry calls are slow to compile; numpy takes milliseconds and is the same on every device.
    """
    from csg_jax.convert import flatten, unflatten

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    out = {}
    for comp, tree in param_shapes(unet, text).items():
        flat = {}
        for path, leaf in sorted(flatten(tree).items()):
            shape, name = tuple(leaf.shape), path[-1]
            if name == "bias":
                v = np.zeros(shape)
            elif name == "scale":
                v = np.ones(shape)
            elif name == "kernel":  # Dense (in, out) or Conv (h, w, in, out)
                std = math.sqrt(1.0 / int(np.prod(shape[:-1]))) / 0.87962566103423978  # truncnorm(-2, 2) std
                v = std * _truncated_normal(rng, shape)
            elif name == "embedding":
                std = token_embed_std if path[-2] == "token_embedding" else 1.0 / math.sqrt(shape[-1])
                v = std * rng.standard_normal(shape)
            else:
                raise ValueError(f"no initialiser for parameter {'/'.join(path)}")
            flat[path] = v.astype(np.float32)
        out[comp] = unflatten(flat)
    return out


def _truncated_normal(rng: np.random.Generator, shape: tuple, bound: float = 2.0) -> np.ndarray:
    """Standard normal samples truncated to [-bound, bound] (redraws; ~5% redrawn at 2)."""
    v = rng.standard_normal(shape)
    bad = np.abs(v) > bound
    while bad.any():
        v[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(v) > bound
    return v


def check_recipe(saved: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint under another noise schedule or image scale (the weights
    would be trained on one and continued on the other). ``saved``: the checkpoint's config dict;
    one without the fields was trained with :data:`LEGACY_RECIPE`."""
    from csg_jax.errors import ConfigError

    schedule = saved.get("beta_schedule", LEGACY_RECIPE[0])
    scale = float(saved.get("scaling_factor", LEGACY_RECIPE[1]))
    if (schedule, scale) != (cfg.beta_schedule, float(cfg.scaling_factor)):
        names = {v: k for k, v in RECIPES.items()}
        raise ConfigError(
            f"the checkpoint was trained with beta_schedule={schedule}, scaling_factor={scale} "
            f"(recipe {names.get((schedule, scale), 'custom')}), this run asks for {cfg.beta_schedule}, "
            f"{cfg.scaling_factor}: pass --recipe {names.get((schedule, scale), '...')} to resume it, or a new "
            f"--out (optionally --init-from an export) to start the other recipe")


def load_params_from_folder(folder: str, unet, text) -> dict:
    """Float32 params ``{"unet", "text_encoder"}`` of a diffusers model folder (e.g. an earlier
    export), checked against this run's parameter shapes."""
    import jax

    from csg_jax.errors import ConfigError
    from csg_jax.pipeline import load_pipeline

    loaded = load_pipeline(folder).params
    params = {k: jax.tree.map(lambda a: np.asarray(a, np.float32), loaded[k]) for k in ("unet", "text_encoder")}
    want = jax.tree.map(lambda a: tuple(a.shape), param_shapes(unet, text))
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if want != got:
        raise ConfigError(f"{folder}: its model does not have this run's architecture; cannot --init-from it")
    return params


def trained_steps_of(folder: str) -> int:
    """Training steps behind a model folder (its model_index.json's ``csg_jax.trained_steps``;
    0 if it does not say)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return int(json.load(f).get("csg_jax", {}).get("trained_steps", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def make_optimizer(cfg: TrainConfig):
    """AdamW *direction* (clip -> Adam -> decoupled weight decay); the step multiplies by -lr
    itself so the LR schedule's horizon can be a traced value (see :func:`learning_rate`).
    Weight decay skips 1-D params (biases, norm scales)."""
    import jax
    import optax

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    )


def learning_rate(step, horizon, cfg: TrainConfig):
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine to ``lr * final_lr_fraction``
    at ``horizon`` (held after). ``step``/``horizon`` may be traced ints."""
    import jax.numpy as jnp

    step = jnp.asarray(step, jnp.float32)
    warm = float(max(cfg.warmup_steps, 1))
    span = jnp.maximum(jnp.asarray(horizon, jnp.float32) - warm, 1.0)
    frac = jnp.clip((step - warm) / span, 0.0, 1.0)
    floor = cfg.final_lr_fraction
    cosine = cfg.lr * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < warm, cfg.lr * (step + 1) / warm, cosine)


def _train_state_class():
    from flax import struct

    @struct.dataclass
    class TrainState:
        """All of a run's mutable state; checkpointed whole, so a resumed run is bit-identical."""

        step: Any  # () int32, optimizer steps taken
        horizon: Any  # () int32, LR schedule horizon
        params: Any
        opt_state: Any
        ema: Any  # exponential moving average of params (what gets exported)
        rng: Any  # (2,) uint32 raw key data

    return TrainState


TrainState = None  # set lazily (flax import) by init_state


def init_state(cfg: TrainConfig, unet, text, tx):
    import jax
    import jax.numpy as jnp

    global TrainState
    if TrainState is None:
        TrainState = _train_state_class()
    params = init_params(unet, text, cfg.seed, cfg.token_embed_std)

    @jax.jit  # one small compile instead of a kernel per leaf
    def build(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            horizon=jnp.asarray(cfg.steps, jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(jax.random.key(cfg.seed)),
        )

    return build(params)


# Rematerialisation (jax.checkpoint) of the forward pass, least memory saved first. Without it
# the 32x32 self-attention dominates: ~250 MB of residuals per sample in float32 (63 GB at batch
# 256), mostly (B, 4, 1024, 1024) logits/probabilities. "attention" recomputes only attention
# internals and other large tensors in the backward pass (~72 MB/sample, ~+25% attention work);
# "full" recomputes everything but Dense outputs (~16 MB/sample, ~+33% compute).
REMAT_MODES = ("off", "attention", "full")


def remat_policy(mode: str, batch_size: int):
    """The ``jax.checkpoint`` policy of a remat mode (None: no checkpointing)."""
    import jax
    from jax import lax

    if mode == "off":
        return None
    if mode == "full":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if mode != "attention":
        raise ValueError(f"remat mode must be one of {REMAT_MODES}, not {mode!r}")
    big = batch_size * 200_000  # elements; a 32x32 self-attention map is 4.2M per sample

    def policy(prim, *avals, **params):
        """Save an op's output unless it is a batched matmul (attention) or touches a big tensor."""
        try:
            if prim is lax.dot_general_p and params["dimension_numbers"][1][0]:
                return False
            return all(int(np.prod(a.shape)) < big for a in avals if hasattr(a, "shape"))
        except Exception:  # unexpected primitive signature: recompute (always correct)
            return False

    return policy


def make_loss_fn(cfg: TrainConfig, unet, text, remat: str = "off") -> Callable:
    """``loss(params, x_t, t, ids, target, weights=None, loc=None) -> (loss, parts)``.

    The MSE of the UNet's v-prediction; with ``weights`` (B, H, W) the weighted mean
    sum(w * e^2) / sum(w) over pixels and channels. With ``loc = (columns (B, K) int32,
    masks (B, H, W) float, keep (B,) float)`` the cross-attention of those token columns is
    recorded and ``cfg.loc_weight *`` :func:`localisation_loss` is added. ``parts``:
    {"mse", "loc"} (loc 0 without ``loc``)."""
    import jax
    import jax.numpy as jnp

    from csg_jax.models.attention import AttentionControl
    from csg_jax.models.unet import attention_layers

    def loss_fn(params, x_t, t, ids, target, weights=None, loc=None):
        context = text.apply({"params": params["text_encoder"]}, ids)
        control, layers = None, []
        if loc is not None:
            layers = [l for l in attention_layers(unet.config, x_t.shape[1:3]) if l.kind == "cross"]
            control = AttentionControl(record=tuple((l.name, "token_mean") for l in layers), token_columns=loc[0])
        out, records = unet.apply({"params": params["unet"]}, x_t, t, context, control)
        err = jnp.square(out.astype(jnp.float32) - target)
        if weights is None:
            mse = jnp.mean(err)
        else:
            w = jnp.broadcast_to(weights[..., None], err.shape)
            mse = jnp.sum(w * err) / jnp.sum(w)
        if loc is None:
            return mse, {"mse": mse, "loc": jnp.zeros((), jnp.float32)}
        resolutions = {l.name: l.resolution for l in layers}
        term = localisation_loss(records, resolutions, loc[1], loc[2])
        return mse + cfg.loc_weight * term, {"mse": mse, "loc": term}

    policy = remat_policy(remat, cfg.batch_size)
    return loss_fn if remat == "off" else jax.checkpoint(loss_fn, policy=policy)


def localisation_loss(records: dict, resolutions: dict, masks, keep):
    """Mean over layers, words and kept images of ``(1 - share)^2``: TokenCompose's token loss
    (Wang et al., CVPR 2024), the grounding objective SD gets for free from its data scale.

    records: {layer: (B, h*w, K)} head-mean attention probability of K words per query pixel;
    resolutions: {layer: (h, w)}; masks: (B, H, W) float object masks (H, W multiples of h, w);
    keep: (B,) float, 1 where the image counts. ``share`` = attention mass inside the mask
    (average-pooled to the layer's grid, as :mod:`csg_jax.shapes.localisation` measures it) /
    total mass.

    Why: after 8,881 steps the shape word put only 1.35x its area share of attention inside the
    object (the issue asks >= 2): the causal text encoder copies "circle" into every later token,
    so nothing forces the UNet to read the shape from the shape word's own column, and CSG's
    mask is built from that column.
    """
    import jax.numpy as jnp

    from csg_jax.shapes.localisation import pooled_mask

    b = masks.shape[0]
    per_layer = []
    for name, attn in records.items():
        inside = pooled_mask(masks, resolutions[name]).reshape(b, -1, 1)  # (B, h*w, 1)
        attn = attn.astype(jnp.float32)
        share = jnp.sum(attn * inside, axis=1) / jnp.maximum(jnp.sum(attn, axis=1), 1e-12)  # (B, K)
        per_layer.append(jnp.mean(jnp.square(1.0 - share), axis=-1))
    per_image = jnp.mean(jnp.stack(per_layer), axis=0)
    return jnp.sum(per_image * keep) / jnp.maximum(jnp.sum(keep), 1.0)


def residual_bytes(cfg: TrainConfig, unet, text, params, remat: str) -> int:
    """Bytes the backward pass keeps from the forward pass at ``cfg.batch_size`` (tracing only)."""
    import jax
    import jax.numpy as jnp

    B, c = cfg.batch_size, unet.config
    x = jax.ShapeDtypeStruct((B, c.sample_size, c.sample_size, c.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((B,), jnp.int32)
    ids = jax.ShapeDtypeStruct((B, 77), jnp.int32)
    loss_fn = make_loss_fn(cfg, unet, text, remat)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    loc = None
    if cfg.loc_weight > 0:
        loc = (jax.ShapeDtypeStruct((B, len(LOC_WORDS)), jnp.int32),
               jax.ShapeDtypeStruct((B, c.sample_size, c.sample_size), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.float32))

    def backward(p, x, t, ids, loc):
        return jax.vjp(lambda q: loss_fn(q, x, t, ids, x, None, loc)[0], p)[1]

    vjp = jax.eval_shape(backward, abstract, x, t, ids, loc)
    return int(sum(np.prod(l.shape) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(vjp)))


def memory_limit() -> Optional[int]:
    """Bytes JAX may use on the default device (GPU/TPU allocator limit), else half the available
    host RAM (a CPU run shares the machine)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return None


def choose_remat(cfg: TrainConfig, unet, text, params, limit: Optional[int], fraction: float = 0.45) -> str:
    """Least rematerialisation whose residuals fit in ``fraction`` of ``limit`` (the rest is
    for the transients of the backward pass); "full" if none does."""
    for mode in REMAT_MODES[:-1]:
        need = residual_bytes(cfg, unet, text, params, mode)
        print(f"[remat] {mode}: {need / 2**30:.2f} GiB of residuals at batch {cfg.batch_size}", flush=True)
        if limit is None or need <= fraction * limit:
            return mode
    return REMAT_MODES[-1]


def sample_timesteps(key, batch_size: int, num_train_timesteps: int, cfg: TrainConfig):
    """(B,) int32 training timesteps: uniform on [0, T), except that a share ``cfg.t_focus`` of
    them is uniform on [t_focus_min, t_focus_max).

    Why (for the ``sd_latent`` recipe; the cosine one needs no focus): with images scaled by
    0.18215 most of SD's timesteps leave too little signal for the
    object's outline to matter (at t = 500 a pixel's signal is 0.11 of the noise); the shape is
    decided below t ~ 400 and its corners below t ~ 150. Uniform sampling spends 60% of the steps
    where only colours and the blob's place are learned, which the model already knows early.
    For the cosine recipe the window to focus on is higher: there the shape word matters most
    around t = 700 (a wrong shape word raised the 6,406-step model's outline-band x̂₀ error by 7%
    at t = 700, by 1-3% at t = 300-500), because below ~500 the outline can be read off x_t
    itself and above ~900 even the object's place is unknown; ``t_focus 0.5`` on [500, 900) gives that window
    0.7 of the steps instead of 0.4.
    With ``t_focus = 0`` the draw is exactly the uniform one (same key use as before the option).
    """
    import jax
    import jax.numpy as jnp

    t = jax.random.randint(key, (batch_size,), 0, num_train_timesteps)
    if cfg.t_focus <= 0.0:
        return t
    k_pick, k_low = jax.random.split(jax.random.fold_in(key, 1))
    hi = min(cfg.t_focus_max, num_train_timesteps)
    focused = jax.random.randint(k_low, (batch_size,), min(cfg.t_focus_min, hi - 1), hi)
    return jnp.where(jax.random.bernoulli(k_pick, cfg.t_focus, (batch_size,)), focused, t)


def make_train_step(cfg: TrainConfig, configs: dict, unet, text, tx, remat: str = "off") -> Callable:
    """``step(state, pool, tables) -> (state, metrics)``, jit-compiled with the state donated.

    pool: {"images": (N, 32, 32, 3) uint8, "rows": (N,) int32 caption rows, "bands": (N, 32, 32)
    uint8 outline bands (:func:`edge_bands`; weighted by ``cfg.edge_weight``, unused at 0),
    "masks": (N, 32, 32) uint8 object masks (used by ``cfg.loc_weight``)}; tables: {"tokens":
    (K, 77) int32 with row 0 = "", "words": (K, len(LOC_WORDS)) int32 (:func:`word_columns`)}.
    Metrics: loss (as optimised), mse, loc (the localisation term, unweighted), grad_norm, lr
    (device scalars)."""
    import jax
    import jax.numpy as jnp
    import optax

    from csg_jax.schedule import SchedulerConfig, add_noise, make_schedule, velocity

    schedule = make_schedule(SchedulerConfig.from_dict(configs["scheduler"]), 50)  # only ᾱ is used
    T = schedule.num_train_timesteps
    B = cfg.batch_size
    loss_fn = make_loss_fn(cfg, unet, text, remat)

    def step(state, pool, tables):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_idx, k_t, k_noise, k_drop = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (B,), 0, pool["images"].shape[0])
        x0 = (pool["images"][idx].astype(jnp.float32) / 127.5 - 1.0) * cfg.scaling_factor
        drop = jax.random.bernoulli(k_drop, cfg.p_uncond, (B,))
        rows = pool["rows"][idx]
        ids = tables["tokens"][jnp.where(drop, EMPTY_ROW, rows)]
        t = sample_timesteps(k_t, B, T, cfg)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = add_noise(schedule, x0, noise, t)
        target = velocity(schedule, x0, noise, t)

        weights = None
        if cfg.edge_weight > 0:
            weights = 1.0 + cfg.edge_weight * pool["bands"][idx].astype(jnp.float32)
        loc = None
        if cfg.loc_weight > 0:  # a dropped caption has no words to ground
            keep = jnp.logical_and(~drop, t < cfg.loc_t_max).astype(jnp.float32)
            loc = (tables["words"][rows], pool["masks"][idx].astype(jnp.float32), keep)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x_t, t, ids, target, weights, loc)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, state.horizon, cfg)
        params = optax.apply_updates(state.params, jax.tree.map(lambda d: -lr * d, direction))
        # EMA with a short warm-up ((1+n)/(10+n)) so early exports are not dominated by the init.
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new, {"loss": loss, "mse": parts["mse"], "loc": parts["loc"], "grad_norm": grad_norm, "lr": lr}

    return jax.jit(step, donate_argnums=(0,))


# --------------------------------------------------------------------------------------
# Checkpoints (Orbax) and export (diffusers folder)
# --------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax CheckpointManager (keep 2) of the whole TrainState plus a JSON of the config.

    State is copied to host before saving (the train step donates its input buffers, so device
    arrays handed to an async save could be deleted under it). A failing Orbax (version skew on
    another machine) disables checkpointing with a warning instead of killing the run: the
    periodic exports are what matter.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.enabled = True
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        if not self.enabled:
            return None
        try:
            return self.manager.latest_step()
        except Exception as e:
            self.enabled = False
            print(f"[ckpt] WARNING: cannot list checkpoints, checkpointing disabled: {e}", flush=True)
            return None

    def save(self, step: int, state, meta: dict) -> None:
        if not self.enabled:
            return
        import jax

        try:
            host = jax.device_get(state)
            args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(host),
                                           meta=self.ocp.args.JsonSave(meta))
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            self.enabled = False
            print(f"[ckpt] WARNING: saving failed, checkpointing disabled: {type(e).__name__}: {e}", flush=True)

    def restore(self, step: int, like):
        """(state, meta) of ``step``; ``like`` is a state with the right structure/shapes/dtypes."""
        import jax

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                       meta=self.ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return jax.tree.map(jax.numpy.asarray, out["state"]), dict(out["meta"])

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            print(f"[ckpt] WARNING: closing the checkpoint manager failed: {e}", flush=True)


def export_model(folder: str, configs: dict, ema_params: dict, step: int, words=None,
                 tar_path: Optional[str] = None, scaling_factor: float = SCALING_FACTOR,
                 base_steps: int = 0) -> str:
    """Write the EMA weights as a diffusers-format pixel model folder, atomically (a new folder is
    renamed over the old one), and optionally a tar of it (also atomic). Returns ``folder``.

    ``base_steps``: steps behind the weights the run started from (``--init-from``); the folder
    records ``trained_steps`` = base + step, and the split when there is a base."""
    import jax

    from csg_jax.testing import write_model_folder

    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(ema_params))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    meta = {"kind": "pixel", "scaling_factor": float(scaling_factor), "mask_res": 16,
            "trained_steps": int(base_steps) + int(step)}
    if base_steps:
        meta.update(init_steps=int(base_steps), trained_steps_this_run=int(step))
    write_model_folder(tmp, configs, host, words=words or shapes_words(), csg_jax_meta=meta,
                       weight_dtype=np.float16)
    for root, dirs, files in os.walk(tmp):  # mkdtemp makes 0700; make it an ordinary folder
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    old = None
    if os.path.exists(folder):
        old = folder + f".old-{os.getpid()}"
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if tar_path:
        tar_folder(folder, tar_path)
    return folder


def tar_folder(folder: str, tar_path: str) -> None:
    """Uncompressed tar of ``folder`` (arcname = its base name), written to a temp file and renamed."""
    tar_path = os.path.abspath(tar_path)
    os.makedirs(os.path.dirname(tar_path), exist_ok=True)
    tmp = tar_path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        tf.add(folder, arcname=os.path.basename(folder.rstrip("/")))
    os.replace(tmp, tar_path)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunOptions:
    """How to run (not part of the model's recipe)."""

    out: str  # checkpoint directory
    export: Optional[str] = None  # diffusers folder written at the end and every export_every s
    export_tar: Optional[str] = None  # tar of the export folder, rewritten with every export
    log: Optional[str] = None  # JSON-lines log; default <out>/train_log.jsonl
    time_budget_s: Optional[float] = None  # wall-clock budget from process start (pool, compile included)
    fit_schedule: bool = True  # with a budget: shrink the LR horizon to the steps that fit
    calibrate_steps: int = 100  # steps timed (after the first) before fitting the horizon
    export_every_s: float = 0.0  # 0: export only at the end
    ckpt_every: int = 1000
    log_every: int = 50
    workers: Optional[int] = None  # pool worker processes (default: cores - 1)
    progress: bool = True
    reserve_s: float = 20.0  # budget kept back for the final checkpoint + export
    compile_cache: Optional[str] = None  # JAX persistent compilation cache directory
    init_from: Optional[str] = None  # diffusers folder whose weights start a new run (ignored on resume)


class _Log:
    """Appends JSON lines, flushed each time (a killed run keeps what it wrote)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a")

    def write(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar (sparse updates when stderr is not a terminal), or None without tqdm."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 15.0, file=sys.stderr)


def _is_oom(e: Exception) -> bool:
    s = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def train(cfg: TrainConfig, opts: RunOptions, t_start: Optional[float] = None) -> dict:
    """Run (or resume) training; returns a summary dict. ``t_start``: when the budget clock
    started (default: now); the CLI passes its own start time so imports count."""
    t0 = time.perf_counter() if t_start is None else t_start
    elapsed = lambda: time.perf_counter() - t0
    os.makedirs(opts.out, exist_ok=True)
    log = _Log(opts.log or os.path.join(opts.out, "train_log.jsonl"))

    # 1. Start rendering the pool right away; it overlaps with imports, init and compilation.
    pool_job = PoolJob(cfg.pool_size, cfg.seed, opts.workers)
    print(f"[pool] rendering {cfg.pool_size} scenes with {pool_job.workers} worker processes", flush=True)

    import jax
    import jax.numpy as jnp

    if opts.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(opts.compile_cache))
    print(f"[jax] {jax.__version__} devices={jax.devices()}", flush=True)
    configs = model_configs(beta_schedule=cfg.beta_schedule)
    words = shapes_words()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_clip_tokenizer(tmp, words)
        tokenizer = load_tokenizer(tmp)
    assert vocab == configs["text_encoder"]["vocab_size"], (vocab, configs["text_encoder"]["vocab_size"])
    table_captions = all_captions()
    tables = {"tokens": jnp.asarray(tokenize(tokenizer, table_captions)),
              "words": jnp.asarray(word_columns(tokenizer, table_captions))}

    unet, text = build_models(configs, cfg.dtype)
    tx = make_optimizer(cfg)
    ckpt = None
    try:
        ckpt = Checkpointer(os.path.join(opts.out, "checkpoints"))
    except Exception as e:
        print(f"[ckpt] WARNING: Orbax unavailable, no checkpoints: {type(e).__name__}: {e}", flush=True)

    lineage = {"base_steps": 0}  # steps behind the --init-from weights (kept in the checkpoints)

    def fresh_state():
        """Initial state, or the latest checkpoint's (2. resume)."""
        state = init_state(cfg, unet, text, tx)
        latest = ckpt.latest_step() if ckpt is not None else None
        if latest is not None:
            state, meta = ckpt.restore(latest, state)
            check_recipe(meta.get("config", {}), cfg)
            lineage["base_steps"] = int(meta.get("base_steps", 0))
            print(f"[ckpt] resumed from step {latest} ({ckpt.directory})", flush=True)
            if meta.get("config", {}).get("steps") != cfg.steps:  # a new plan: its horizon
                state = state.replace(horizon=jnp.asarray(cfg.steps, jnp.int32))
        elif opts.init_from:
            params = load_params_from_folder(opts.init_from, unet, text)
            state = state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
            lineage["base_steps"] = trained_steps_of(opts.init_from)
            print(f"[init] weights from {opts.init_from} (fresh optimizer, step 0)", flush=True)
        return state, latest

    state, resumed_from = fresh_state()
    n_params = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in state.params.items()}
    print(f"[model] params: {n_params}", flush=True)
    start_step = int(state.step)

    # 3. Compile ahead of time against the pool's shapes (the pool is still rendering). If the
    #    step does not fit the device, halve the batch (XLA's estimate, or a failed first step).
    pixels = (cfg.pool_size, IMAGE_SIZE, IMAGE_SIZE)
    pool_abstract = {"images": jax.ShapeDtypeStruct(pixels + (3,), jnp.uint8),
                     "rows": jax.ShapeDtypeStruct((cfg.pool_size,), jnp.int32),
                     "bands": jax.ShapeDtypeStruct(pixels, jnp.uint8), "masks": jax.ShapeDtypeStruct(pixels, jnp.uint8)}

    limit = memory_limit()
    remat = cfg.remat
    if remat == "auto":
        remat = choose_remat(cfg, unet, text, state.params, limit)

    def compile_step(batch_size, remat):
        run_cfg = dataclasses.replace(cfg, batch_size=batch_size, remat=remat)
        t_c = time.perf_counter()
        compiled = make_train_step(run_cfg, configs, unet, text, tx, remat).lower(
            state, pool_abstract, tables).compile()
        return run_cfg, compiled, time.perf_counter() - t_c

    batch_size = cfg.batch_size
    while True:
        try:
            run_cfg, compiled, compile_s = compile_step(batch_size, remat)
        except Exception as e:
            if not (_is_oom(e) and batch_size // 2 >= MIN_BATCH):
                raise
            batch_size //= 2
            print(f"[compile] out of memory ({str(e)[:200]}); batch -> {batch_size}", flush=True)
            continue
        need = _memory_estimate(compiled, limit)
        print(f"[compile] train step compiled in {compile_s:.1f}s (batch {batch_size}, remat {remat})", flush=True)
        smaller = _fitting_batch(batch_size, need, limit)
        if smaller < batch_size:
            print(f"[compile] needs {need / 2**30:.1f} of {limit / 2**30:.1f} GiB; batch -> {smaller}", flush=True)
            batch_size = smaller
            continue
        break

    # 4. Pool to the device.
    # Wait at most half of what is left of the budget (a lost worker task would block forever).
    wait = max(60.0, 0.5 * (opts.time_budget_s - elapsed())) if opts.time_budget_s else None
    images, captions, masks = pool_job.result(timeout=wait)
    rate = len(images) / pool_job.seconds
    print(f"[pool] {len(images)} scenes in {pool_job.seconds:.1f}s ({rate:.0f} scenes/s, "
          f"{pool_job.workers} workers; ready {elapsed():.1f}s after start)", flush=True)
    pool = jax.device_put({"images": images, "rows": caption_rows(captions, table_captions),
                           "bands": edge_bands(masks, cfg.edge_width), "masks": masks.astype(np.uint8)})
    del images, captions, masks

    log.write(event="start", step=start_step, elapsed=round(elapsed(), 2), resumed_from=resumed_from,
              batch_size=batch_size, remat=remat, compile_s=round(compile_s, 2), pool_s=round(pool_job.seconds, 2),
              pool_rate=round(rate, 1), devices=[str(d) for d in jax.devices()])

    # 5. Train.
    target = max(cfg.steps, start_step)
    bar = _progress(target, start_step, opts.progress)
    pending: list = []  # device metrics not yet fetched (fetching syncs, so only every log_every)
    last_export = time.perf_counter()
    exported_step = None
    t_first = None  # wall time when the first step of this process finished (excludes its wait)
    step = start_step
    fitted = False
    stop_reason = "steps"
    first_call = True
    with _StopRequest() as stop_request:  # handlers restored however the loop ends
        while step < target:
            if opts.time_budget_s and elapsed() > opts.time_budget_s - opts.reserve_s:
                stop_reason = "time budget"
                break
            if stop_request.signal:
                stop_reason = f"signal {stop_request.signal}"
                print(f"\n[train] {stop_reason}: checkpoint and export at step {step}, then exit", flush=True)
                break
            try:
                state, metrics = compiled(state, pool, tables)
                if first_call:
                    jax.block_until_ready(metrics["loss"])
            except Exception as e:
                if not (first_call and _is_oom(e) and batch_size // 2 >= MIN_BATCH):
                    raise
                batch_size //= 2  # the donated state may be gone: rebuild it
                print(f"[train] out of memory on the first step; batch -> {batch_size}", flush=True)
                state, _ = fresh_state()
                run_cfg, compiled, compile_s = compile_step(batch_size, remat)
                continue
            step += 1
            pending.append(metrics)
            _wait_for_older_steps(pending)  # ... but the stop checks must see the device's progress
            if first_call:
                t_first, first_call = time.perf_counter(), False
            if bar is not None:
                bar.update(1)

            # Fit the LR horizon to the budget once the speed is known (during warmup: no LR jump).
            if (opts.time_budget_s and opts.fit_schedule and not fitted
                    and step - start_step == opts.calibrate_steps + 1):
                jax.block_until_ready(metrics["loss"])
                per_step = (time.perf_counter() - t_first) / opts.calibrate_steps
                left = opts.time_budget_s - opts.reserve_s - elapsed()
                fit = int(step + 0.95 * left / per_step)  # 5%: periodic exports / checkpoints / logging
                horizon = max(step + 1, min(cfg.steps, fit))
                state = state.replace(horizon=jnp.asarray(horizon, jnp.int32))
                target = horizon
                fitted = True
                if bar is not None:
                    bar.total = target
                    bar.refresh()
                print(f"\n[schedule] {1 / per_step:.1f} steps/s -> LR horizon {horizon} steps "
                      f"(asked {cfg.steps})", flush=True)
                log.write(event="fit_schedule", step=step, steps_per_s=round(1 / per_step, 3), horizon=horizon)

            if step % opts.log_every == 0 or step == target:
                fetched = jax.device_get(pending)
                pending = []
                loss = float(np.mean([m["loss"] for m in fetched]))
                record = dict(step=step, loss=round(loss, 6), elapsed=round(elapsed(), 2),
                              mse=round(float(np.mean([m["mse"] for m in fetched])), 6),
                              lr=float(fetched[-1]["lr"]), grad_norm=round(float(fetched[-1]["grad_norm"]), 4))
                if cfg.loc_weight > 0:
                    record["loc"] = round(float(np.mean([m["loc"] for m in fetched])), 5)
                log.write(**record)
                if bar is not None:
                    sps = _samples_per_s(step, start_step, t_first, batch_size)
                    bar.set_postfix(loss=f"{loss:.4f}", sps=f"{sps:.0f}")
                elif step % (opts.log_every * 10) == 0:
                    print(json.dumps(record), flush=True)
                if not np.isfinite(loss):
                    stop_reason = "non-finite loss"
                    print(f"\n[train] non-finite loss at step {step}; stopping", flush=True)
                    break

            if ckpt is not None and opts.ckpt_every and step % opts.ckpt_every == 0:
                ckpt.save(step, state, {"config": dataclasses.asdict(run_cfg), "model": configs, **lineage})
            if opts.export and opts.export_every_s and time.perf_counter() - last_export > opts.export_every_s:
                export_model(opts.export, configs, state.ema, step, words, opts.export_tar, cfg.scaling_factor,
                             lineage["base_steps"])
                last_export, exported_step = time.perf_counter(), step
                log.write(event="export", step=step, elapsed=round(elapsed(), 2))
    jax.block_until_ready(state.step)
    t_end_train = time.perf_counter()
    if bar is not None:
        bar.close()

    # 6. Final checkpoint and export.
    if ckpt is not None:
        if step != start_step and ckpt.latest_step() != step:
            ckpt.save(step, state, {"config": dataclasses.asdict(run_cfg), "model": configs, **lineage})
        ckpt.close()
    if opts.export and stop_reason != "non-finite loss" and exported_step != step:
        export_model(opts.export, configs, state.ema, step, words, opts.export_tar, cfg.scaling_factor,
                             lineage["base_steps"])
        log.write(event="export", step=step, elapsed=round(elapsed(), 2))

    steps_run = step - start_step
    timed = steps_run - 1  # the first step's time includes its wait for the device
    train_s = (t_end_train - t_first) if t_first else 0.0
    summary = {
        "steps": step, "steps_this_run": steps_run, "resumed_from": resumed_from, "stop": stop_reason,
        "batch_size": batch_size, "remat": remat, "compile_s": round(compile_s, 2), "pool_s": round(pool_job.seconds, 2),
        "pool_scenes_per_s": round(rate, 1),
        "steps_per_s": round(timed / train_s, 3) if timed > 0 and train_s > 0 else None,
        "samples_per_s": round(timed * batch_size / train_s, 1) if timed > 0 and train_s > 0 else None,
        "wall_s": round(elapsed(), 2), "horizon": int(state.horizon), "export": opts.export,
    }
    log.write(event="end", **summary)
    log.close()
    return summary


def _wait_for_older_steps(pending: list, depth: int = 2) -> None:
    """Bounds how far the Python loop runs ahead of the device: JAX dispatches steps
    asynchronously, so without a bound the budget and signal checks see the time of dispatch, and a
    stop comes up to ``log_every`` steps late (69 s past the budget on the CPU). ``pending`` holds
    the metrics of the steps dispatched since the last fetch (which synced the older ones); wait
    until all but the newest ``depth`` have run."""
    if len(pending) > depth:
        import jax

        jax.block_until_ready(pending[-depth - 1]["loss"])


class _StopRequest:
    """SIGINT / SIGTERM during training ask for a clean stop (checkpoint + export) after the
    current step instead of killing the run; a second one stops at once. A no-op off the main
    thread (signal handlers can only be installed there)."""

    def __init__(self):
        import signal
        import threading

        self.signal, self._old = None, {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def __enter__(self) -> "_StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame):
        import signal

        if self.signal is not None:  # asked twice: give up on the clean stop
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _samples_per_s(step: int, start_step: int, t_first: Optional[float], batch_size: int) -> float:
    if t_first is None or step - start_step < 2:
        return 0.0
    return (step - start_step - 1) * batch_size / max(time.perf_counter() - t_first, 1e-9)


MIN_BATCH = 8  # out-of-memory fallbacks halve the batch down to this


def _fitting_batch(batch_size: int, need: int, limit: Optional[int], fraction: float = 0.9) -> int:
    """The batch, halved until XLA's estimate (scaled linearly) fits ``fraction`` of the limit."""
    while limit and need > fraction * limit and batch_size // 2 >= MIN_BATCH:
        batch_size //= 2
        need //= 2
    return batch_size


def _memory_estimate(compiled, limit: Optional[int]) -> int:
    """Bytes XLA plans for the compiled step (0 if unknown); printed with the device limit."""
    try:
        m = compiled.memory_analysis()
        need = int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)
        gib = lambda b: b / 2**30
        print(f"[compile] step memory: args {gib(m.argument_size_in_bytes):.2f} GiB, temp "
              f"{gib(m.temp_size_in_bytes):.2f} GiB" + (f"; limit {gib(limit):.1f} GiB" if limit else ""),
              flush=True)
        return need
    except Exception:
        return 0
