"""A deterministic judge of shapes-world images: what shape, what colours, where is the object.

* :class:`JudgeNet` is a small CNN with three heads (shape, object colour, background colour),
  trained on procedural train-split images by :mod:`csg_jax.shapes.judge_train`
  (``scripts/train_judge.py``); its weights ship as ``assets/judge.safetensors`` (fp16) next to
  ``assets/judge.json`` (its held-out accuracy).
* :func:`load_judge` returns a :class:`Judge`: ``judge(images_uint8)`` -> labels per head.
* :func:`object_mask` segments the object given the judged colours (for IoU measurements).

Images everywhere are uint8 (B, H, W, 3) or float in [0, 1]; the network sees 32x32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.shapes import world

HEADS = {"shape": world.SHAPES, "color": world.COLOR_NAMES, "background": world.COLOR_NAMES}
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHTS = os.path.join(ASSETS, "judge.safetensors")
REPORT = os.path.join(ASSETS, "judge.json")


class JudgeNet(nn.Module):
    """(B, 32, 32, 3) in [0, 1] -> {head: (B, classes) logits}.

    Strided convolutions down to 4x4, then a dense layer over the flattened map: flattening (not
    global pooling) keeps *where* things are, which separates object from background colour.
    """

    widths: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        h = x - 0.5
        for i, w in enumerate(self.widths):
            h = nn.relu(nn.Conv(w, (3, 3), strides=1 if i == 0 else 2, padding="SAME", name=f"conv_{i}")(h))
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(h.reshape(h.shape[0], -1)))
        return {name: nn.Dense(len(classes), name=f"head_{name}")(h) for name, classes in HEADS.items()}


def to_input(images) -> jax.Array:
    """uint8 or [0, 1] float (B, H, W, 3) -> float32 (B, H, W, 3) in [0, 1]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(net: JudgeNet, params, x):
    return net.apply({"params": params}, x)


@dataclasses.dataclass(frozen=True)
class Judge:
    """A loaded judge. ``judge(images)`` -> {head: int32 (B,) labels}; ``names`` maps them to words."""

    params: dict
    net: JudgeNet = dataclasses.field(default_factory=JudgeNet)
    report: Optional[dict] = None  # what training measured (accuracies), if known

    def logits(self, images, batch_size: int = 512) -> dict:
        x = to_input(images)
        parts = [_logits(self.net, self.params, x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in HEADS}

    def __call__(self, images, batch_size: int = 512) -> dict:
        return {k: v.argmax(-1).astype(np.int32) for k, v in self.logits(images, batch_size).items()}

    @staticmethod
    def names(labels: dict) -> list[dict]:
        """Per-image {head: word} from :meth:`__call__`'s labels."""
        n = len(labels["shape"])
        return [{k: HEADS[k][int(labels[k][i])] for k in HEADS} for i in range(n)]


def accuracy(judge: Judge, batch: dict) -> dict:
    """Per-head accuracy on a :func:`world.make_batch` batch (labels ``shape``/``color``/``background``)."""
    pred = judge(batch["images"])
    return {k: float(np.mean(pred[k] == np.asarray(batch[k]))) for k in HEADS}


def save_judge(params: dict, path: str = WEIGHTS, report: Optional[dict] = None) -> None:
    """fp16 safetensors (flat "a/b/kernel" keys) and, if given, the report as JSON beside it."""
    from safetensors.numpy import save_file

    flat = {"/".join(str(k.key) for k in key): np.asarray(v, np.float16)
            for key, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(flat, path)
    if report is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)


def load_judge(path: str = WEIGHTS) -> Judge:
    """The judge saved at ``path`` (default: the shipped one); weights are used in float32."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no judge weights at {path}; train them with scripts/train_judge.py")
    params: dict = {}
    for key, value in load_file(path).items():
        *parents, leaf = key.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    report_path = os.path.splitext(path)[0] + ".json"
    report = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    return Judge(params=params, report=report)


# --------------------------------------------------------------------------------------
# Segmentation by colour
# --------------------------------------------------------------------------------------


def object_mask(image, color: str, background: str, brightness: tuple[float, float] = (0.7, 1.3)) -> np.ndarray:
    """bool (H, W): pixels nearer to the object colour than to the (local) background colour.

    The background is its named colour times a brightness ramp (and texture). First pass: the
    distance to the background is to the segment {s * background, s in ``brightness``}, so a
    dark or bright corner stays background. That favours the background at the object's edge
    (a blend of the two colours slides along the segment), so the second pass fits a plane
    s(y, x) to the first pass's background pixels and compares with s(y, x) * background.
    """
    x = np.asarray(to_input(np.asarray(image)[None])[0])
    fg = np.asarray(world.COLORS[color], np.float32)
    bg = np.asarray(world.COLORS[background], np.float32)
    d_fg = np.linalg.norm(x - fg, axis=-1)
    s = np.clip((x @ bg) / max(float(bg @ bg), 1e-6), *brightness)
    first = d_fg < np.linalg.norm(x - s[..., None] * bg, axis=-1)
    if (~first).sum() < 16:
        return first
    h, w = first.shape
    yy, xx = np.mgrid[:h, :w]
    design = np.stack([np.ones(h * w), yy.ravel() / h, xx.ravel() / w], axis=1)
    coef, *_ = np.linalg.lstsq(design[~first.ravel()], s.ravel()[~first.ravel()], rcond=None)
    plane = np.clip(design @ coef, *brightness).reshape(h, w)
    return d_fg < np.linalg.norm(x - plane[..., None] * bg, axis=-1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
