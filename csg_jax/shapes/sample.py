"""Text-to-image sampling (DDIM + classifier-free guidance) from a loaded pipeline, and a cheap
check of whether samples follow their captions' colours.

    python -m csg_jax.shapes.sample --model /tmp/export/shapes_model --out samples.png

:func:`sample` is one jit-compiled ``lax.scan`` over the DDIM sampling plan; the unconditional
branch uses the empty caption "" (what the shapes model was trained with for CFG dropout).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.schedule import ddim_transfer, make_schedule, sampling_plan
from csg_jax.shapes import world


@functools.lru_cache(maxsize=8)
def _sampler(pipe, num_steps: int):
    """jit-compiled (params, cond, uncond, x_T, guidance) -> final latent; cached per pipeline."""
    schedule = make_schedule(pipe.scheduler_config, num_steps)
    plan = sampling_plan(schedule)

    @jax.jit
    def run(params, cond, uncond, x_T, guidance):
        context = jnp.concatenate([uncond, cond])

        def step(x, xs):
            t, a_t, a_prev = xs
            out, _ = pipe.unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]), t, context)
            out_u, out_c = jnp.split(out.astype(jnp.float32), 2)
            guided = out_u + guidance * (out_c - out_u)
            return ddim_transfer(guided, x, a_t, a_prev, schedule.prediction_type), None

        x0, _ = jax.lax.scan(step, x_T, plan)
        return pipe.decode(params, x0)

    return run


def sample(pipe, captions: list[str], num_steps: int = 50, guidance_scale: float = 5.0, seed: int = 0) -> np.ndarray:
    """uint8 images (B, H, W, 3) for ``captions`` (B = len(captions)); deterministic in ``seed``."""
    b = len(captions)
    size = pipe.unet.config.sample_size
    x_T = jax.random.normal(jax.random.key(seed), (b, size, size, pipe.unet.config.in_channels), jnp.float32)
    cond = pipe.embed(list(captions))
    uncond = pipe.embed([""] * b)
    images = _sampler(pipe, int(num_steps))(pipe.params, cond, uncond, x_T, jnp.float32(guidance_scale))
    images = np.asarray(jax.device_get(images), np.float32)
    return ((np.clip(images, -1.0, 1.0) + 1.0) * 127.5 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Caption adherence by colour (no classifier needed)
# --------------------------------------------------------------------------------------

_PALETTE = np.array([world.COLORS[c] for c in world.COLOR_NAMES], np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    return world.COLOR_NAMES[int(np.argmin(np.sum((_PALETTE - rgb) ** 2, axis=-1)))]


def read_colours(image: np.ndarray, border: int = 2, threshold: float = 0.25) -> tuple[str, Optional[str]]:
    """(background colour, object colour or None) of a uint8 (H, W, 3) shapes image, by naming
    the median of the border ring, then the median of the pixels far (> threshold in RGB) from it."""
    x = image.astype(np.float32) / 255.0
    ring = np.concatenate([x[:border].reshape(-1, 3), x[-border:].reshape(-1, 3),
                           x[:, :border].reshape(-1, 3), x[:, -border:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    far = np.linalg.norm(x - bg, axis=-1) > threshold
    fg = _nearest_colour(np.median(x[far], axis=0)) if far.sum() >= 8 else None
    return _nearest_colour(bg), fg


def colour_adherence(images: np.ndarray, captions: list[str]) -> dict:
    """Fractions of images whose background / object colour matches the caption
    ("a <colour> <shape> on a <colour> background")."""
    bg_ok = fg_ok = 0
    for image, cap in zip(images, captions):
        words = cap.split()
        bg, fg = read_colours(image)
        bg_ok += bg == words[5]
        fg_ok += fg == words[1]
    n = max(len(captions), 1)
    return {"background_colour": bg_ok / n, "object_colour": fg_ok / n, "n": len(captions)}


def demo_captions(n: int = 32, seed: int = 0) -> list[str]:
    """n held-out-split captions (every shape and colour turns up for n >= ~40)."""
    return world.make_batch(seed, n, split="heldout")["captions"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Sample the shapes model; write a PNG grid and colour adherence.")
    p.add_argument("--model", required=True, help="diffusers-format folder (e.g. the training export)")
    p.add_argument("--out", default=None, help="PNG grid of the samples (needs Pillow)")
    p.add_argument("--json", default=None, help="write the adherence numbers here")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from csg_jax.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    captions = demo_captions(args.n, args.seed)
    images = sample(pipe, captions, args.steps, args.guidance_scale, args.seed)
    result = colour_adherence(images, captions)
    truth = colour_adherence(world.make_batch(args.seed, args.n, split="heldout")["images"], captions)
    result.update(guidance_scale=args.guidance_scale, steps=args.steps, on_real_images=truth)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "captions": captions}, f, indent=2)
    if args.out:
        try:
            save_grid(args.out, images)
        except ImportError:
            np.save(args.out + ".npy", images)
            print(f"Pillow missing: wrote {args.out}.npy instead", flush=True)
    return 0


def save_grid(path: str, images: np.ndarray, cols: int = 8, scale: int = 2) -> None:
    """Tile uint8 (B, H, W, 3) images into one PNG (nearest-upscaled by ``scale``)."""
    from PIL import Image

    b, h, w, _ = images.shape
    rows = -(-b // cols)
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = im
    img = Image.fromarray(canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
