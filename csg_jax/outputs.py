"""One edit's files on disk: edit.png, reconstruction.png, masks, grid.png, meta.json (+ latents).

Shared by the single-image CLI and dataset runs; written atomically (:class:`csg_jax.io.StagedDir`).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from csg_jax import io


def write_item_outputs(out_dir: str, result, config, *, model_info: dict, image_info: dict, timings: dict,
                       save_inversion: bool = False, save_latents: bool = False,
                       extra_meta: Optional[dict] = None, source_png: bool = False) -> dict:
    """Write one edit's files (edit.png, reconstruction.png, mask.png, mask_raw.png, grid.png,
    meta.json; source.png, inversion.npy / latents.npz on request) into ``out_dir``, atomically: the folder
    appears only when complete (:class:`csg_jax.io.StagedDir`). Returns {file name: final path}.
    Used by the single-image CLI and by dataset runs (csg_jax/dataset/run.py)."""
    from csg_jax.editing.costs import unet_evaluations, unet_evaluations_per_step

    with io.StagedDir(out_dir) as stage:
        j = lambda name: os.path.join(stage.path, name)
        h, w = result.edit.shape[:2]
        mask_img = io.mask_to_image(result.mask, (h, w))
        io.save_png(j("edit.png"), io.to_uint8(result.edit))
        io.save_png(j("reconstruction.png"), io.to_uint8(result.reconstruction))
        io.save_png(j("mask.png"), mask_img)
        io.save_png(j("mask_raw.png"), io.mask_to_image(result.mask_raw, (h, w)))
        source = result.source_image if result.source_image is not None else result.reconstruction
        io.save_png(j("grid.png"), io.grid([source, io.overlay(source, mask_img), result.reconstruction, result.edit],
                                           ["source", "mask", "reconstruction", "edit"]))
        names = ["edit.png", "reconstruction.png", "mask.png", "mask_raw.png", "grid.png"]
        if source_png:  # a source that exists nowhere else (a generated image): evaluate reads it
            io.save_png(j("source.png"), io.to_uint8(source))
            names.append("source.png")
        if save_inversion:
            io.save_npy(j("inversion.npy"), result.inverted)
            names.append("inversion.npy")
            if getattr(result, "null_embeddings", None) is not None:  # null-text: needed to edit x_T again
                io.save_npy(j("null_embeddings.npy"), result.null_embeddings)
                names.append("null_embeddings.npy")
        if save_latents:
            latents = {"inverted": result.inverted, "reconstruction": result.reconstruction_latent,
                       "edited": result.edited_latent, "mask_raw": result.mask_raw, "mask": result.mask}
            io.atomic_write(j("latents.npz"), lambda f: np.savez(f, **{k: np.asarray(v) for k, v in latents.items()}))
            names.append("latents.npz")
        meta = {
            "settings": config.to_dict(),
            "prompts": result.plan.to_dict(),
            "model": model_info,
            "image": image_info,
            "unet_evaluations": getattr(result, "unet_evaluations", None) or {
                "per_step": unet_evaluations_per_step(config), "total": unet_evaluations(config)},
            "timings_s": timings,
            **({"null_text_iterations": np.asarray(result.null_text_iterations).tolist()}
               if getattr(result, "null_text_iterations", None) is not None else {}),
            **(extra_meta or {}),
        }
        io.save_json(j("meta.json"), meta)
        names.append("meta.json")
        out = stage.commit()
    return {name: os.path.join(out, name) for name in names}
