"""A procedural world of one coloured shape on a textured background, with captions and masks.

Everything is numpy and seeded. A scene is drawn by :func:`sample_scene` and rendered by
:func:`render` with 4x supersampling (smooth edges); :func:`caption` gives
"a red circle on a blue background"; the ground-truth object mask comes with the image.

Splits: ``"train"`` and ``"heldout"`` draw from disjoint seed streams
(``numpy.random.SeedSequence(seed, spawn_key=(split_id,))``), so evaluation images are never
training images.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Named colours, far apart in RGB so a caption's colour is unambiguous.
COLORS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.88),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.58, 0.18, 0.75),
    "orange": (0.98, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
COLOR_NAMES = tuple(COLORS)
SPLITS = {"train": 0, "heldout": 1}
VOCABULARY = ("a", "on", "background") + SHAPES + COLOR_NAMES


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str  # object colour name
    background: str  # background colour name (never the object's)
    cx: float  # centre, in units of the image side (0..1)
    cy: float
    radius: float  # half size, in units of the image side
    angle: float  # rotation in radians
    gradient: tuple[float, float]  # direction * strength of the background's brightness ramp
    texture_seed: int


def sample_scene(rng: np.random.Generator, shape: Optional[str] = None, color: Optional[str] = None,
                 background: Optional[str] = None) -> Scene:
    """A random scene; any of shape / colour / background can be fixed."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    choices = [c for c in COLOR_NAMES if c != color]
    background = background or choices[rng.integers(len(choices))]
    if background == color:
        raise ValueError("object and background colours must differ")
    radius = float(rng.uniform(0.22, 0.34))
    margin = radius * 0.9
    cx, cy = (float(v) for v in rng.uniform(0.5 - (0.5 - margin) * 0.5, 0.5 + (0.5 - margin) * 0.5, size=2))
    angle = float(rng.uniform(-0.3, 0.3))
    g = rng.normal(size=2)
    g = tuple(float(v) for v in 0.12 * g / (np.linalg.norm(g) + 1e-8))
    return Scene(shape, color, background, cx, cy, radius, angle, g, int(rng.integers(2**31)))


def caption(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} on a {scene.background} background"


def parse_caption(text: str) -> dict:
    """Inverse of :func:`caption`: ``{"shape", "color", "background"}`` of "a red circle on a blue
    background"; ValueError for any other text."""
    words = text.split()
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background"
            or words[1] not in COLORS or words[2] not in SHAPES or words[5] not in COLORS):
        raise ValueError(f"not a shapes-world caption: {text!r}")
    return {"shape": words[2], "color": words[1], "background": words[5]}


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Membership of points (object frame, radius 1) in the unit shape."""
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    if shape == "square":
        return (np.abs(x) <= 0.82) & (np.abs(y) <= 0.82)
    if shape == "triangle":  # pointing up, inscribed in the unit circle
        return (y <= 0.5) & (np.sqrt(3) * x - y <= 1.0) & (-np.sqrt(3) * x - y <= 1.0)
    if shape == "cross":
        arm = 0.32
        return ((np.abs(x) <= arm) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= arm) & (np.abs(x) <= 1.0))
    if shape == "star":  # five points, inner radius 0.45
        r = np.sqrt(x**2 + y**2)
        theta = np.arctan2(x, -y)  # 0 at the top
        sector = 2 * np.pi / 5
        phi = np.abs(((theta + sector / 2) % sector) - sector / 2)  # 0 at a tip, sector/2 between
        inner, outer = 0.45, 1.0
        # boundary: straight line between the tip (outer, 0) and the notch (inner, sector/2), in polar form
        tip = np.array([outer, 0.0])
        notch = np.array([inner * np.cos(sector / 2), inner * np.sin(sector / 2)])
        px, py = r * np.cos(phi), r * np.sin(phi)
        cross = (notch[0] - tip[0]) * (py - tip[1]) - (notch[1] - tip[1]) * (px - tip[0])
        return cross >= 0
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene, size: int = 32, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size, 3) float32 in [0, 1], mask (size, size) bool: object covers >= half the pixel)."""
    s = size * supersample
    coords = (np.arange(s) + 0.5) / s
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = (xx - scene.cx) / scene.radius, (yy - scene.cy) / scene.radius
    c, si = np.cos(scene.angle), np.sin(scene.angle)
    inside = _inside(scene.shape, c * dx + si * dy, -si * dx + c * dy)
    coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))

    rng = np.random.default_rng(scene.texture_seed)
    ramp = 1.0 + scene.gradient[0] * (np.arange(size)[None, :] / size - 0.5) * 2 + scene.gradient[1] * (
        np.arange(size)[:, None] / size - 0.5) * 2
    texture = 1.0 + 0.05 * rng.standard_normal((size, size))
    bg = np.asarray(COLORS[scene.background], np.float32)[None, None] * (ramp * texture)[..., None]
    fg = np.asarray(COLORS[scene.color], np.float32)[None, None] * np.ones((size, size, 1), np.float32)
    image = np.clip(coverage[..., None] * fg + (1 - coverage[..., None]) * bg, 0.0, 1.0).astype(np.float32)
    return image, coverage >= 0.5


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """bool (..., H, W) grown by ``pixels`` (square neighbourhood)."""
    out = masks.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        grown[..., 1:, 1:] |= out[..., :-1, :-1]
        grown[..., :-1, :-1] |= out[..., 1:, 1:]
        grown[..., 1:, :-1] |= out[..., :-1, 1:]
        grown[..., :-1, 1:] |= out[..., 1:, :-1]
        out = grown
    return out


def boundary_band(masks: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` pixels (8-neighbour steps) of the object's outline, (..., H, W) bool:
    the dilated mask minus the eroded mask. This is where two shapes of the same size and place
    differ (a square's corners, a star's notches), so it is where a shape is drawn or not."""
    masks = np.asarray(masks, bool)
    shrunk = ~dilate(~masks, width)
    return dilate(masks, width) & ~shrunk


def split_rng(seed: int, split: str = "train") -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split],)))


def make_batch(seed: int, n: int, size: int = 32, split: str = "train", **fixed) -> dict:
    """n scenes from one seed of a split: images uint8 (n, size, size, 3), masks bool (n, size, size),
    captions, scenes, and integer labels (shape, color, background indices)."""
    rng = split_rng(seed, split)
    scenes = [sample_scene(rng, **fixed) for _ in range(n)]
    rendered = [render(sc, size) for sc in scenes]
    images = np.stack([(im * 255 + 0.5).astype(np.uint8) for im, _ in rendered])
    masks = np.stack([m for _, m in rendered])
    return {
        "images": images,
        "masks": masks,
        "captions": [caption(sc) for sc in scenes],
        "scenes": scenes,
        "shape": np.array([SHAPES.index(sc.shape) for sc in scenes], np.int32),
        "color": np.array([COLOR_NAMES.index(sc.color) for sc in scenes], np.int32),
        "background": np.array([COLOR_NAMES.index(sc.background) for sc in scenes], np.int32),
    }


def demo_image(size: int) -> np.ndarray:
    """The CLIs' demo picture (a red circle on a textured blue background), (size, size, 3) uint8:
    the renderer the shapes model was trained on."""
    scene = Scene("circle", "red", "blue", cx=0.5, cy=0.5, radius=0.3, angle=0.0, gradient=(0.08, -0.06),
                  texture_seed=0)
    image, _ = render(scene, size)
    return (image * 255 + 0.5).astype(np.uint8)
