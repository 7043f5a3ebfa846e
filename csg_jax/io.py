"""Files in and out: reading odd images safely, atomic writes, PNG grids of results."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from csg_jax.errors import ImageError

# files read as images wherever a folder is scanned (dataset --input-dir, evaluation results)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")


def load_image(path: str, size: int, multiple: int) -> tuple[np.ndarray, list[str]]:
    """Read any image PIL can, as (size', size', 3) uint8 RGB; returns (image, notices).

    RGBA/LA/P are composited on white, grayscale is replicated, 16-bit and float images are
    rescaled to 8 bits; the short side is resized to ``size`` and the long side centre-cropped
    to a multiple of ``multiple`` (each change is reported in ``notices``).
    """
    from PIL import Image, UnidentifiedImageError

    notices = []
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notices.append(f"converted {hi:.0f}-max {img.mode} image to 8 bits")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
        notices.append("composited the transparent image on white")
    if img.mode != "RGB":
        notices.append(f"converted mode {img.mode} to RGB")
        img = img.convert("RGB")
    w, h = img.size
    (nw, nh), (cw, ch) = _fit(path, w, h, size, multiple)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if (cw, ch) != (nw, nh):
        left, top = (nw - cw) // 2, (nh - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    if (cw, ch) != (w, h):
        notices.append(f"resized {w}x{h} to {cw}x{ch} (short side {size}, sides multiples of {multiple})")
    return np.asarray(img, dtype=np.uint8), notices


def _fit(path: str, w: int, h: int, size: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized w, h), (cropped w, h)) of a w x h image under :func:`load_image`'s rules."""
    if min(w, h) < 8:
        raise ImageError(f"image {path} is too small ({w}x{h})")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return (nw, nh), (nw - nw % multiple, nh - nh % multiple)


def fitted_size(path: str, size: int, multiple: int) -> tuple[int, int]:
    """(H, W) that :func:`load_image` will return for ``path``, from the file's header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    _, (cw, ch) = _fit(path, w, h, size, multiple)
    return ch, cw


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W[, C]) -> uint8."""
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def mask_to_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) mask in ~[0, 1] -> (H, W) uint8, nearest-upscaled so latent pixels stay visible."""
    from PIL import Image

    m = Image.fromarray(to_uint8(mask), "L")
    return np.asarray(m.resize((size[1], size[0]), Image.NEAREST))


def overlay(image: np.ndarray, mask: np.ndarray, floor: float = 0.2) -> np.ndarray:
    """The (H, W, 3) [0, 1] image where the (H, W) uint8 mask is 255, dimmed to ``floor`` of its
    brightness where it is 0 (linearly between). Dimming, not a colour tint: a tint hides on an
    object of the tint's colour (the demo's red circle) and colours the background wherever the
    soft mask is slightly above 0."""
    m = mask.astype(np.float32)[..., None] / 255.0
    return image * (floor + (1.0 - floor) * m)


def grid(panels: list[np.ndarray], labels: Optional[list[str]] = None, pad: int = 4,
         min_side: int = 128) -> np.ndarray:
    """Side-by-side (H, W, 3) [0, 1] panels with white padding and labels -> uint8.

    Panels smaller than ``min_side`` are enlarged by a whole factor (nearest neighbour, so pixels
    stay pixels): a 32x32 edit is unreadable at its own size and its label would overrun it.
    """
    from PIL import Image, ImageDraw

    scale = max(1, -(-min_side // max(min(p.shape[:2]) for p in panels)))
    tiles = [Image.fromarray(to_uint8(p)).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST)
             for p in panels]
    h = max(t.height for t in tiles)
    label_h = 12 if labels else 0
    w = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("RGB", (w, h + 2 * pad + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (x, pad + label_h))
        if labels:
            draw.text((x, 1), labels[i], fill=(0, 0, 0))
        x += tile.width + pad
    return np.asarray(canvas)


def save_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def save_json(path: str, data: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=json_default).encode()))


def save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def json_default(o):
    """``json.dumps(default=...)``: numpy scalars as numbers, anything else as its str."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def atomic_write(path: str, write) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers never see a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StagedDir:
    """Build an output folder under a temp name; ``commit()`` moves it into place atomically.

    On error (or without commit) the temp folder is removed, so no partial output is left.
    """

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.final)}.partial-", dir=parent)

    def commit(self) -> str:
        old = None
        if os.path.exists(self.final):
            old = self.final + f".old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False
