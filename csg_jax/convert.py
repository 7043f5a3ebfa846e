"""PyTorch-layout state dicts <-> Flax param trees, with numpy only.

Our Flax modules are named after the checkpoint's keys, so conversion is a tree walk:

* a PyTorch key ``down_blocks.0.resnets.1.conv1.weight`` maps to the Flax path
  ``("down_blocks_0", "resnets_1", "conv1", "kernel")``: numeric components are glued
  to the component before them with ``_``;
* the leaf ``weight`` becomes whatever the Flax template has at that place: ``kernel``
  (Conv: OIHW -> HWIO; Dense: (out, in) -> (in, out); a 1x1 conv stored for a Dense is
  squeezed first), ``scale`` (LayerNorm / GroupNorm) or ``embedding`` (Embed);
  ``bias`` stays ``bias``.

The walk is checked both ways: every tensor of the checkpoint must be used and every
parameter of the template must be filled, with matching shapes. Errors name the tensor.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from csg_jax.errors import CheckpointError

# Flax components that end in "_<digits>" but are *names* in the checkpoint, not list indices.
_NAMES_WITH_DIGIT_SUFFIX = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"^(.*)_(\d+)$")


class WeightConversionError(CheckpointError, ValueError):
    """A checkpoint does not fit the model it is being loaded into."""


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """``"a.b.0.c.weight"`` -> ``(("a", "b_0", "c"), "weight")``."""
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), parts[-1]


def module_path_to_torch_prefix(path: Iterable[str]) -> str:
    """Inverse of the module part of :func:`torch_key_to_module_path`."""
    out = []
    for comp in path:
        m = _INDEXED.match(comp)
        if m and comp not in _NAMES_WITH_DIGIT_SUFFIX:
            out.extend([m.group(1), m.group(2)])
        else:
            out.append(comp)
    return ".".join(out)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _to_flax(leaf: str, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4 and len(target_shape) == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        else:
            if array.ndim == 4 and array.shape[2:] == (1, 1):
                array = array[:, :, 0, 0]  # 1x1 conv stored where we use a Dense
            if array.ndim == 2:
                array = array.T
    return array


def _to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        if array.ndim == 2:
            return array.T
    return array


def state_dict_to_flax(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    source: str = "checkpoint",
    ignore: Iterable[str] = (),
    dtype: Any = None,
    place: Any = None,
) -> dict:
    """Convert a PyTorch-layout ``state_dict`` into a Flax param tree shaped like ``template``.

    ``template`` is a (possibly abstract, e.g. from ``jax.eval_shape``) param tree; leaves
    need ``.shape``. ``ignore`` lists regexes of checkpoint keys that are buffers, not
    parameters (e.g. ``position_ids``). Raises :class:`WeightConversionError` naming the
    first offending tensors. ``place``: applied to each converted tensor at once (e.g.
    ``jnp.asarray``), so that with lazily read tensors (:func:`csg_jax.weights.read_state_dict`
    ``lazy=True``) only one PyTorch-layout tensor is held at a time.
    """
    want = flatten(template)
    ignore_res = [re.compile(p) for p in ignore]
    out: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for key, array in state_dict.items():
        if any(r.search(key) for r in ignore_res):
            continue
        module, leaf = torch_key_to_module_path(key)
        if leaf == "bias":
            candidates = ["bias"]
        elif leaf == "weight":
            candidates = ["kernel", "scale", "embedding"]
        else:
            candidates = [leaf]
        for cand in candidates:
            path = module + (cand,)
            if path in want:
                break
        else:
            unused.append(key)
            continue
        target_shape = tuple(want[path].shape)
        arr = _to_flax(cand, np.asarray(array), target_shape)
        if tuple(arr.shape) != target_shape:
            raise WeightConversionError(
                f"{source}: tensor '{key}' has shape {tuple(getattr(array, 'shape', np.shape(array)))}, but the model expects "
                f"{target_shape} for {'/'.join(path)} (after layout conversion: {tuple(arr.shape)}). "
                "Does config.json match the weights?"
            )
        if dtype is not None:
            arr = arr.astype(dtype)
        out[path] = arr if place is None else place(arr)
    missing = sorted("/".join(p) for p in want if p not in out)
    if unused or missing:
        msg = [f"{source}: the weights do not match the model architecture."]
        if unused:
            msg.append(f"  {len(unused)} tensor(s) in the file are not used by the model, e.g. {unused[:5]}")
        if missing:
            msg.append(f"  {len(missing)} model parameter(s) have no tensor in the file, e.g. {missing[:5]}")
        raise WeightConversionError("\n".join(msg))
    return unflatten(out)


def flax_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_flax`: Flax params -> PyTorch-layout numpy state dict."""
    out = {}
    for path, value in flatten(params).items():
        leaf = path[-1]
        torch_leaf = "bias" if leaf == "bias" else "weight"
        key = module_path_to_torch_prefix(path[:-1]) + "." + torch_leaf
        out[key] = np.ascontiguousarray(_to_torch(leaf, np.asarray(value)))
    return out
