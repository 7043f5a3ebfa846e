"""The paper's metrics as batched, jitted scorers over uint8 images.

* :class:`ClipSimilarity` -- CS: cosine between CLIP's image embedding of the edit and the text
  embedding of the target prompt (plain cosine, the paper's ~0.29-0.33 scale; ``clipscore`` =
  CLIPScore's ``2.5 * max(cos, 0)`` is also returned); ``clip_score``: PIE-Bench's
  ``100 * max(cos, 0)``, optionally of the masked image.
* :class:`StructureDistance` -- SD (Splice / Plug-and-Play): DINO ViT keys of the last block
  (heads concatenated) -> cosine self-similarity over all tokens incl. [CLS] -> mean squared
  difference between source and edit matrices (``StructureDistance.pie_bench``: PIE-Bench's input).
* :class:`Perceptual` -- Johnson et al.'s VGG-16 perceptual distances, pairwise over a set, for
  RD (Eq. 19, :func:`csg_jax.metrics.vgg.relational_distance`).
* :class:`LPIPSScorer` -- LPIPS and BG-LPIPS: the spatial LPIPS map averaged over background
  pixels (``mask < 0.5``).

Images are (B, H, W, 3) uint8 numpy arrays of one size per call; batches are padded to a fixed
size (repeating the last row) so each image size compiles once. Matmuls run at HIGHEST precision
(no TF32 on GPUs).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.metrics import preprocess as pp
from csg_jax.metrics import vgg as V
from csg_jax.metrics.vit import CLIPModel, LoadedCLIP, LoadedViT

CLIPSCORE_W = 2.5
PIE_CLIPSCORE_W = 100.0  # torchmetrics CLIPScore, as PIE-Bench reports it


def run_batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int, progress=None) -> np.ndarray:
    """Apply ``fn(*batch_arrays) -> (b, ...)`` over the leading axis in fixed-size batches (the last
    one padded by repeating its final row); returns the concatenated numpy result."""
    n = len(arrays[0])
    outs = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        chunk = []
        for a in arrays:
            c = np.asarray(a[start:stop])
            if stop - start < batch_size and n > batch_size:
                c = np.concatenate([c, np.repeat(c[-1:], batch_size - (stop - start), axis=0)])
            chunk.append(c)
        with jax.default_matmul_precision("highest"):
            out = np.asarray(fn(*chunk))
        outs.append(out[: stop - start])
        if progress is not None:
            progress(stop - start)
    return np.concatenate(outs) if outs else np.zeros((0,))


def _pil_clip_preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """CLIPImageProcessor exactly: PIL 8-bit bicubic resize, centre crop, CLIP mean/std (host side)."""
    from PIL import Image

    out = []
    for img in images:
        h, w = pp.shortest_side_size(img.shape[:2], size)
        r = np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        top, left = (h - size) // 2, (w - size) // 2
        r = r[top:top + size, left:left + size] / 255.0
        out.append((r - np.asarray(pp.CLIP_MEAN, np.float32)) / np.asarray(pp.CLIP_STD, np.float32))
    return np.stack(out)


class ClipSimilarity:
    """CS. ``resample``: "antialias" (JAX, default), "torch" (no antialias) or "pil" (PIL on the
    host: bit-exact CLIPImageProcessor input); see :mod:`csg_jax.metrics.preprocess`."""

    def __init__(self, clip: LoadedCLIP, resample: str = "antialias", batch_size: int = 8):
        if resample not in pp.RESAMPLERS + ("pil",):
            raise ValueError(f"unknown resampler {resample!r}")
        self.clip, self.resample, self.batch_size = clip, resample, batch_size
        model, size = clip.model, clip.image_size

        def image_fn(params, images):
            x = images if resample == "pil" else pp.clip_preprocess(images.astype(jnp.float32), size, resample)
            e = model.apply({"params": params}, x, method=CLIPModel.image_features)
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        def text_fn(params, ids):
            e = model.apply({"params": params}, ids, method=CLIPModel.text_features)
            return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

        self._image = jax.jit(image_fn)
        self._text = jax.jit(text_fn)

    def image_embeds(self, images: np.ndarray, progress=None) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, P) unit vectors."""
        x = _pil_clip_preprocess(images, self.clip.image_size) if self.resample == "pil" else images
        return run_batched(partial(self._image, self.clip.params), [x], self.batch_size, progress)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> (B, P) unit vectors (tokenised to the text tower's 77 positions, truncated)."""
        tok = self.clip.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=self.clip.max_length, truncation=True,
                  return_tensors="np")["input_ids"].astype(np.int32)
        return run_batched(partial(self._text, self.clip.params), [ids], self.batch_size)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], progress=None) -> dict:
        """{"cs": (B,) cosine, "clipscore": (B,) 2.5 * max(cos, 0)}."""
        cos = np.sum(self.image_embeds(images, progress) * self.text_embeds(prompts), axis=-1)
        return {"cs": cos, "clipscore": CLIPSCORE_W * np.maximum(cos, 0.0)}

    def clip_score(self, images: np.ndarray, prompts: Sequence[str], masks: Optional[np.ndarray] = None,
                   progress=None) -> np.ndarray:
        """PIE-Bench's CLIP similarity (torchmetrics ``CLIPScore``): (B,) ``100 * max(cos, 0)`` of
        (B, H, W, 3) uint8 ``images``; with ``masks`` (B, H, W) bool, of ``images * masks`` (the
        edited part on black, as PIE-Bench's ``np.uint8(img * mask)``)."""
        if masks is not None:
            images = images * np.asarray(masks, bool)[..., None].astype(np.uint8)
        cos = np.sum(self.image_embeds(images, progress) * self.text_embeds(prompts), axis=-1)
        return PIE_CLIPSCORE_W * np.maximum(cos, 0.0)


def self_similarity(keys: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Splice's ``attn_cosine_sim``: (B, T, C) -> (B, T, T) cosine similarities (norm products clamped at eps)."""
    hi = jax.lax.Precision.HIGHEST
    n = jnp.linalg.norm(keys, axis=-1)
    return jnp.einsum("btc,bsc->bts", keys, keys, precision=hi) / jnp.maximum(n[:, :, None] * n[:, None, :], eps)


class StructureDistance:
    """SD with a DINO ViT (``facebook/dino-vitb8``): images resized (short side ``size``, long side
    at most ``max_size``, bilinear antialias), ImageNet-normalised. ``scale`` / ``resample``:
    :func:`~csg_jax.metrics.preprocess.dino_preprocess`'s (:meth:`pie_bench` gives PIE-Bench's)."""

    def __init__(self, dino: LoadedViT, size: int = 224, max_size: int = 480, resample: str = "antialias",
                 batch_size: int = 8, scale: float = 1 / 255):
        self.dino, self.batch_size = dino, batch_size
        model = dino.model

        def ssim(params, images):
            x = pp.dino_preprocess(images.astype(jnp.float32), size, max_size, resample, scale)
            return self_similarity(model.apply({"params": params}, x)["keys"])

        def sd(params, src, edit):
            s = ssim(params, jnp.concatenate([src, edit]))
            sd = jnp.mean((s[: src.shape[0]] - s[src.shape[0]:]) ** 2, axis=(1, 2))
            return jnp.where(jnp.all(src == edit, axis=(1, 2, 3)), 0.0, sd)  # exactly 0 for identical images

        self._ssim = jax.jit(ssim)
        self._sd = jax.jit(sd)

    @classmethod
    def pie_bench(cls, dino: LoadedViT, size: int = 224, max_size: int = 480, batch_size: int = 8):
        """PIE-Bench's structure distance: its evaluator normalises 0..255 values (no /255) after a
        tensor ``Resize(224, max_size=480)``, bilinear without antialiasing (torchvision < 0.17)."""
        return cls(dino, size, max_size, resample="torch", batch_size=batch_size, scale=1.0)

    def self_similarity(self, images: np.ndarray) -> np.ndarray:
        return run_batched(partial(self._ssim, self.dino.params), [images], self.batch_size)

    def __call__(self, sources: np.ndarray, edits: np.ndarray, progress=None) -> np.ndarray:
        """(B,) structure distances between matching rows (same image size)."""
        return run_batched(partial(self._sd, self.dino.params), [sources, edits], self.batch_size, progress)


class Perceptual:
    """Johnson et al.'s perceptual distance on VGG-16 (relu1_2, relu2_2, relu3_3, relu4_3), optionally
    after resizing to ``size`` x ``size`` (bilinear antialias; None: native size)."""

    def __init__(self, config: V.ConvNetConfig, params: dict, size: Optional[int] = None, batch_size: int = 8):
        self.config, self.params, self.size, self.batch_size = config, params, size, batch_size

        def feats(params, images):
            x = images.astype(jnp.float32)
            if size:
                x = pp.resize(x, (size, size), "bilinear")
            return V.perceptual_features(params, config, x / 255.0)

        self._feats = jax.jit(feats)
        self._pair = jax.jit(lambda p, a, b: V.pairwise_perceptual(feats(p, a), feats(p, b)))
        self._cross = jax.jit(lambda p, fa, b: V.pairwise_perceptual(fa, feats(p, b)))
        def dist(p, a, b):
            f = feats(p, jnp.concatenate([a, b]))
            d = V.perceptual_distance({t: v[: a.shape[0]] for t, v in f.items()},
                                      {t: v[a.shape[0]:] for t, v in f.items()})
            return jnp.where(jnp.all(a == b, axis=(1, 2, 3)), 0.0, d)

        self._dist = jax.jit(dist)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(B,) distances between matching rows."""
        return run_batched(partial(self._dist, self.params), [a, b], self.batch_size)

    def pairwise(self, images: np.ndarray, progress=None) -> np.ndarray:
        """(n, n) symmetric matrix of distances among ``images`` (zero diagonal).

        Memory stays at two batches of features: the features of block I are kept while every
        block J >= I is recomputed (n/B (n/B + 1) / 2 block products)."""
        n, B = len(images), self.batch_size
        pad = (-n) % B if n > B else 0
        x = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]) if pad else np.asarray(images)
        bs = min(B, len(x))
        blocks = [x[i:i + bs] for i in range(0, len(x), bs)]
        g = np.zeros((len(x), len(x)), np.float64)
        with jax.default_matmul_precision("highest"):
            for i, bi in enumerate(blocks):
                fi = self._feats(self.params, bi)
                for j in range(i, len(blocks)):
                    d = np.asarray(self._cross(self.params, fi, blocks[j]), np.float64)
                    g[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = d
                    g[j * bs:(j + 1) * bs, i * bs:(i + 1) * bs] = d.T
                if progress is not None:
                    progress(1)
        g = g[:n, :n]
        np.fill_diagonal(g, 0.0)
        return g


class LPIPSScorer:
    """LPIPS (lpips v0.1, VGG or AlexNet trunk) and BG-LPIPS."""

    def __init__(self, config: V.ConvNetConfig, trunk: dict, heads: dict, batch_size: int = 8):
        self.config, self.trunk, self.heads, self.batch_size = config, trunk, heads, batch_size

        def fn(trunk, heads, a, b, bg):
            to_pm1 = lambda u: u.astype(jnp.float32) / 127.5 - 1.0
            out = V.lpips(trunk, heads, config, to_pm1(a), to_pm1(b))
            bgf = bg.astype(jnp.float32)
            area = jnp.sum(bgf, axis=(1, 2))
            bg_val = jnp.sum(out["map"] * bgf, axis=(1, 2)) / jnp.maximum(area, 1.0)
            return jnp.stack([out["value"], jnp.where(area > 0, bg_val, jnp.nan),
                              area / (bg.shape[1] * bg.shape[2])], axis=-1)

        self._fn = jax.jit(fn)

    def __call__(self, sources: np.ndarray, edits: np.ndarray, background: Optional[np.ndarray] = None,
                 progress=None) -> dict:
        """sources, edits: (B, H, W, 3) uint8; background: (B, H, W) bool (True = background; None:
        whole image). Returns {"lpips": (B,), "bg_lpips": (B,) (NaN without background pixels),
        "bg_fraction": (B,)}."""
        if background is None:
            background = np.ones(sources.shape[:3], bool)
        out = run_batched(partial(self._fn, self.trunk, self.heads), [sources, edits, background],
                          self.batch_size, progress)
        return {"lpips": out[:, 0], "bg_lpips": out[:, 1], "bg_fraction": out[:, 2]}


def lpips_map(config: V.ConvNetConfig, trunk: dict, heads: dict, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, H, W) spatial LPIPS between uint8 images (for inspection / tests)."""
    f = jax.jit(lambda t, h, x, y: V.lpips(t, h, config, x / 127.5 - 1.0, y / 127.5 - 1.0)["map"])
    with jax.default_matmul_precision("highest"):
        return np.asarray(f(trunk, heads, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
