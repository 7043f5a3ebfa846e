"""diffusers-format model folders -> configs + Flax params (numpy only), and an Orbax cache.

A folder looks like::

    model_index.json
    unet/          config.json, diffusion_pytorch_model.safetensors (or sharded *.safetensors.index.json)
    vae/           config.json, diffusion_pytorch_model.safetensors     (absent for pixel-space models)
    text_encoder/  config.json, model.safetensors
    tokenizer/     vocab.json, merges.txt, ...
    scheduler/     scheduler_config.json

PyTorch ``*.bin`` weights are read only when torch is installed. Every error names the file.
The file readers (:func:`read_json`, :func:`load_safetensors`, :func:`load_torch_file`,
:func:`read_weights`, :func:`load_tokenizer`) also load the evaluation metrics' networks.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from csg_jax.convert import state_dict_to_flax
from csg_jax.errors import CheckpointError, ConfigError

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "transformers": ("model", "pytorch_model"),  # a transformers model folder (CLIPModel, ViTModel)
}


def read_json(path: str) -> dict:
    """A JSON object file; CheckpointError when missing, ConfigError when not a valid JSON object."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or repair the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def resolve_model_path(path_or_id: str) -> str:
    """A local folder as is; otherwise a Hugging Face Hub repo id fetched with ``huggingface_hub``."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise CheckpointError(f"{path_or_id} is a file; expected a diffusers-format model folder")
    looks_like_repo = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"model folder not found: {path_or_id}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path_or_id,
            allow_patterns=["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
            ignore_patterns=["*fp16*", "*non_ema*", "*.ckpt"],
        )
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"'{path_or_id}' is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download the model "
            "(e.g. `huggingface-cli download ...`) and pass the folder instead."
        ) from None


def read_state_dict(component_dir: str, component: str, lazy: bool = False) -> dict[str, np.ndarray]:
    """All tensors of one component as numpy arrays (safetensors, sharded safetensors, or .bin /
    .pth via torch). ``component`` picks the file names (``"transformers"``: ``model.*``,
    ``pytorch_model.*``).

    ``lazy``: safetensors tensors as :class:`LazyTensor` handles instead, each read from disk when
    ``np.asarray`` asks for it, so that a converter holds one PyTorch-layout tensor at a time
    rather than the whole state dict beside the converted params.
    """
    load = _index_safetensors if lazy else load_safetensors
    if not os.path.isdir(component_dir):
        raise CheckpointError(f"missing folder: {component_dir}")
    names = _WEIGHT_NAMES.get(component, ("diffusion_pytorch_model", "model"))
    for name in names:
        single = os.path.join(component_dir, f"{name}.safetensors")
        index = single + ".index.json"
        if os.path.isfile(single):
            return load(single)
        if os.path.isfile(index):
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index} has an empty weight_map")
            out: dict[str, np.ndarray] = {}
            for shard in shards:
                out.update(load(os.path.join(component_dir, shard)))
            return out
    bins = [os.path.join(component_dir, f"{n}{ext}") for n in names for ext in (".bin", ".pth")]
    bins = [b for b in bins if os.path.isfile(b)]
    if bins:
        return load_torch_file(bins[0])
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(component_dir, "*")))
    raise CheckpointError(
        f"no weights in {component_dir}: expected {names[0]}.safetensors (or a sharded "
        f".safetensors.index.json, or .bin / .pth); found {found or 'nothing'}"
    )


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A state dict from a transformers folder (``model.safetensors``, sharded safetensors,
    ``pytorch_model.bin``) or from one file (``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` through
    torch), every floating tensor as float32."""
    if os.path.isdir(path):
        sd = read_state_dict(path, "transformers")
    elif not os.path.isfile(path):
        raise CheckpointError(f"weight file not found: {path}")
    elif path.endswith(".safetensors"):
        sd = load_safetensors(path)
    else:
        sd = load_torch_file(path)
    return {k: (v.astype(np.float32) if v.dtype != np.float32 and np.issubdtype(v.dtype, np.floating) else v)
            for k, v in sd.items()}


def load_tokenizer(folder: str):
    """transformers' ``CLIPTokenizer`` from a folder with ``vocab.json`` and ``merges.txt``."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"missing folder: {folder} (needs vocab.json and merges.txt)")
    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"missing tokenizer file: {os.path.join(folder, name)}")
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"cannot load the CLIP tokenizer in {folder}: {e}") from None


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (float16 / bfloat16 as float32)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing weight file: {path}")
    try:
        from safetensors.numpy import load_file

        raw = load_file(path)
    except Exception as e:
        if "bfloat16" in str(e).lower() or "bf16" in str(e).lower():
            return _load_safetensors_bf16(path)
        raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in raw.items()}


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class LazyTensor:
    """One tensor of a safetensors file, read when converted to an array (float16 / bfloat16 come
    back as float32, as :func:`load_safetensors` gives them)."""

    def __init__(self, path: str, key: str, dtype: str, shape: tuple, start: int, end: int):
        self.path, self.key, self.dtype_name, self.shape, self.start, self.end = path, key, dtype, tuple(shape), start, end

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        if self.dtype_name == "BF16":
            import ml_dtypes
            raw_dtype = ml_dtypes.bfloat16
        elif self.dtype_name in _SAFETENSORS_DTYPES:
            raw_dtype = _SAFETENSORS_DTYPES[self.dtype_name]
        else:
            raise CheckpointError(f"{self.path}: tensor '{self.key}' has dtype {self.dtype_name}, which csg_jax cannot read")
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                buf = f.read(self.end - self.start)
            array = np.frombuffer(buf, dtype=raw_dtype).reshape(self.shape)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor '{self.key}' of {self.path}: {e} (truncated file?)") from None
        if self.dtype_name in ("F16", "BF16"):
            array = array.astype(np.float32)
        return array if dtype is None else array.astype(dtype)


def _index_safetensors(path: str) -> dict[str, LazyTensor]:
    """The header of a safetensors file as {key: LazyTensor}; checks that every tensor lies in the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing weight file: {path}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError(f"header length {header_len} does not fit the {size}-byte file")
            header = json.loads(f.read(header_len))
        base = 8 + header_len
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = (base + int(o) for o in info["data_offsets"])
            if end > size or start > end:
                raise ValueError(f"tensor '{key}' ends at byte {end} of a {size}-byte file")
            out[key] = LazyTensor(path, key, info["dtype"], info["shape"], start, end)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None
    return out


def _load_safetensors_bf16(path: str) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: every tensor through :class:`LazyTensor` (ml_dtypes), as float32."""
    return {key: np.asarray(t).astype(np.float32) for key, t in _index_safetensors(path).items()}


def load_torch_file(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file (``.bin``, ``.pth``, ``.pt``; a ``{"state_dict": ...}`` wrapper is
    unwrapped) as float32 numpy arrays; needs torch."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch file; reading it needs torch. Install torch, or convert it to safetensors "
            "once (a model folder with diffusers' `save_pretrained(..., safe_serialization=True)`, a state "
            "dict with `safetensors.torch.save_file`)."
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in obj.items()}


def convert_component(
    state_dict: dict[str, np.ndarray],
    init_template: Callable[[], Any],
    source: str,
    ignore=(),
    dtype=None,
    place=None,
) -> dict:
    """Convert with a template from ``init_template()`` (an abstract param tree); ``place`` is
    applied to each converted tensor as soon as it is ready (e.g. ``jnp.asarray``)."""
    return state_dict_to_flax(state_dict, init_template(), source=source, ignore=ignore, dtype=dtype, place=place)


def save_params_cache(cache_dir: str, params: dict, meta: dict) -> None:
    """Save converted params with Orbax (plus a small JSON of what they came from)."""
    import orbax.checkpoint as ocp

    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, "params")
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(target, params, force=True)
    tmp = os.path.join(cache_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(cache_dir, "meta.json"))


def load_params_cache(cache_dir: str):
    """(params, meta) from :func:`save_params_cache`, or None when the cache is absent."""
    cache_dir = os.path.abspath(cache_dir)
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    import orbax.checkpoint as ocp

    try:
        params = ocp.PyTreeCheckpointer().restore(os.path.join(cache_dir, "params"))
    except Exception as e:
        raise CheckpointError(f"cannot restore the params cache in {cache_dir}: {e}. Delete the folder to rebuild it.") from None
    return params, read_json(meta_path)
