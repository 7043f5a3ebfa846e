"""A loaded Stable Diffusion model: modules, params, tokenizer, schedule; encode/decode helpers.

``load_pipeline(path_or_id)`` reads a diffusers-format folder (see :mod:`csg_jax.weights`) and
returns a :class:`Pipeline`. Modules are stateless Flax definitions; ``pipeline.params`` is the
one pytree of weights (``{"unet", "text_encoder", "vae"}``) that jit-compiled functions take as
an argument.

Two model kinds:

* ``"latent"`` (Stable Diffusion): latents = VAE posterior mean (or a sample) x ``scaling_factor``;
* ``"pixel"`` (small models without a VAE, e.g. the shipped shapes model): the "latent" *is*
  the image in [-1, 1] times ``scaling_factor``. Declared in ``model_index.json`` as
  ``"csg_jax": {"kind": "pixel", "scaling_factor": ...}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import cached_property
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax import weights
from csg_jax.errors import CheckpointError, ConfigError
from csg_jax.models.clip_text import IGNORE_KEYS as TEXT_IGNORE_KEYS
from csg_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, canonical_keys
from csg_jax.models.unet import UNet2DConditionModel, UNetConfig
from csg_jax.models.vae import AutoencoderKL, VAEConfig, fix_legacy_keys
from csg_jax.schedule import SchedulerConfig

SD_SCALING_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: Optional[AutoencoderKL]  # None for pixel-space models
    tokenizer: Any
    scheduler_config: SchedulerConfig
    params: dict
    scaling_factor: float
    source: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)  # model-recommended edit settings, e.g. mask_res

    @property
    def kind(self) -> str:
        return "pixel" if self.vae is None else "latent"

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion, 1 for pixel-space models)."""
        return 1 if self.vae is None else self.vae.config.downsample_factor

    @property
    def max_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    # -- prompts ---------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """(B, 77) int32 token ids, padded / truncated like diffusers."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np")["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    @cached_property
    def _embed(self):
        return jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))

    def embed_ids(self, ids) -> jax.Array:
        """(B, 77) ids -> (B, 77, D) final text-encoder states (the UNet's context)."""
        return self._embed(self.params["text_encoder"], jnp.asarray(ids))

    def embed(self, prompts: list[str]) -> jax.Array:
        return self.embed_ids(self.tokenize(prompts))

    # -- images <-> latents (pure; usable inside jit with params passed in) ---------------------
    def encode(self, params: dict, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> (B, H/f, W/f, C) scaled latents; posterior mean unless ``rng``."""
        if self.vae is None:
            return images * self.scaling_factor
        mean, logvar = self.vae.apply({"params": params["vae"]}, images, method=AutoencoderKL.encode)
        if rng is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return mean * self.scaling_factor

    def decode(self, params: dict, latents: jax.Array) -> jax.Array:
        """Scaled latents -> (B, H, W, 3) images in [-1, 1] (not clipped)."""
        if self.vae is None:
            return latents / self.scaling_factor
        return self.vae.apply({"params": params["vae"]}, latents / self.scaling_factor, method=AutoencoderKL.decode)


def param_shapes(unet, text, vae, latent_hw=(8, 8)):
    """Abstract param trees (shapes only) of each module, for conversion checks."""
    key = jax.random.PRNGKey(0)
    cross = unet.config.cross_attention_dim
    t = {
        "unet": lambda: jax.eval_shape(
            unet.init, key, jnp.zeros((1, *latent_hw, unet.config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 77, cross))
        )["params"],
        "text_encoder": lambda: jax.eval_shape(text.init, key, jnp.zeros((1, text.config.max_position_embeddings), jnp.int32))["params"],
    }
    if vae is not None:
        f = vae.config.downsample_factor
        t["vae"] = lambda: jax.eval_shape(vae.init, key, jnp.zeros((1, 8 * f, 8 * f, vae.config.in_channels)))["params"]
    return t


def _load_tokenizer(folder: str):
    """The tokenizer of a diffusers folder (its ``tokenizer/`` subfolder)."""
    return weights.load_tokenizer(os.path.join(folder, "tokenizer"))


def load_pipeline(path_or_id: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  cache: Optional[str] = None) -> Pipeline:
    """Load a diffusers-format Stable Diffusion 1.x/2.x folder (or Hub id) into a :class:`Pipeline`.

    ``dtype``: activation dtype (float32 or bfloat16); ``param_dtype``: dtype the weights are kept in.
    ``cache``: an Orbax folder; converted params are restored from it when present and written to it
    otherwise, so a pod's hosts convert once.
    """
    folder = weights.resolve_model_path(os.fspath(path_or_id))
    index = weights.read_json(os.path.join(folder, "model_index.json"))
    ours = index.get("csg_jax", {}) if isinstance(index.get("csg_jax"), dict) else {}
    kind = ours.get("kind", "latent")
    if kind not in ("latent", "pixel"):
        raise ConfigError(f"{folder}/model_index.json: csg_jax.kind must be 'latent' or 'pixel', not {kind!r}")
    for component in ("unet", "text_encoder", "tokenizer", "scheduler") + (("vae",) if kind == "latent" else ()):
        if component not in index and not os.path.isdir(os.path.join(folder, component)):
            raise CheckpointError(f"{folder}: model_index.json lists no '{component}' and the folder is missing")
    if "text_encoder_2" in index:
        raise ConfigError(f"{folder}: {index.get('_class_name')} has a second text encoder (SDXL-style); "
                          "csg_jax supports Stable Diffusion 1.x/2.x only")

    cfg = lambda comp, name="config.json": weights.read_json(os.path.join(folder, comp, name))
    unet_cfg = UNetConfig.from_dict(cfg("unet"), source=os.path.join(folder, "unet", "config.json"))
    try:
        text_cfg = CLIPTextConfig.from_dict(cfg("text_encoder"))
    except ConfigError as e:
        raise ConfigError(f"{folder}/text_encoder/config.json: {e}") from None
    vae_cfg = None
    if kind == "latent":
        try:
            vae_cfg = VAEConfig.from_dict(cfg("vae"))
        except ConfigError as e:
            raise ConfigError(f"{folder}/vae/config.json: {e}") from None
    sched_cfg = SchedulerConfig.from_dict(cfg("scheduler", "scheduler_config.json"))
    if text_cfg.hidden_size != unet_cfg.cross_attention_dim:
        raise ConfigError(
            f"{folder}: text encoder hidden_size {text_cfg.hidden_size} != unet cross_attention_dim "
            f"{unet_cfg.cross_attention_dim}; the components do not belong together"
        )

    kw = dict(dtype=dtype, param_dtype=param_dtype)
    unet = UNet2DConditionModel(unet_cfg, **kw)
    text = CLIPTextModel(text_cfg, **kw)
    vae = AutoencoderKL(vae_cfg, **kw) if vae_cfg is not None else None
    if vae_cfg is not None:
        scaling = float(vae_cfg.scaling_factor)
    else:
        scaling = float(ours.get("scaling_factor", SD_SCALING_FACTOR))

    params = None
    fingerprint = _fingerprint(folder)
    if cache:
        restored = weights.load_params_cache(cache)
        if restored is not None and restored[1].get("fingerprint") == fingerprint:
            params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), restored[0])
    if params is None:
        templates = param_shapes(unet, text, vae)
        params = {}
        # Tensor by tensor: each is read, converted and placed before the next is read (peak: the
        # params plus one tensor; with the cache, the numpy params are kept to be saved first).
        place = None if cache else (lambda a: jnp.asarray(a, param_dtype))
        for comp in templates:
            sd = weights.read_state_dict(os.path.join(folder, comp), comp, lazy=True)
            if comp == "vae":
                sd = fix_legacy_keys(sd)
            if comp == "text_encoder":
                sd = canonical_keys(sd)
            params[comp] = weights.convert_component(
                sd, templates[comp], source=os.path.join(folder, comp),
                ignore=TEXT_IGNORE_KEYS if comp == "text_encoder" else (), dtype=np.dtype(param_dtype), place=place)
            del sd
        if cache:
            weights.save_params_cache(cache, params, {"fingerprint": fingerprint, "source": os.path.abspath(folder)})
        params = jax.tree.map(jnp.asarray, params)
    defaults = {k: ours[k] for k in ("mask_res",) if k in ours}
    return Pipeline(unet, text, vae, _load_tokenizer(folder), sched_cfg, params, scaling, source=folder, defaults=defaults)


def _fingerprint(folder: str) -> str:
    """Identifies the weight files (names, sizes, mtimes) so a stale cache is not reused."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, folder)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def model_summary(pipe: Pipeline) -> dict:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"source": pipe.source, "kind": pipe.kind, **{f"{k}_params": count(v) for k, v in pipe.params.items()},
            "unet": json.loads(json.dumps(dataclasses.asdict(pipe.unet.config)))}
