"""``python -m csg_jax.translate``: edit a photo with text (CSG and its ablations).

Example::

    python -m csg_jax.translate --image cat.png --prompt "a photo of a cat" --task cat2dog --out out/cat2dog

Writes ``edit.png``, ``reconstruction.png``, ``mask.png`` (smoothed, Eq. 11), ``mask_raw.png``,
``grid.png`` (source | mask overlay | reconstruction | edit) and ``meta.json`` into ``--out``;
the folder appears only when everything is written (no partial output on failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from csg_jax import runtime
from csg_jax.errors import run_guarded

from csg_jax.model_zoo import DEMO_PROMPT, DEMO_TASK, SHAPES_MODEL, demo_image, resolve_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csg_jax.translate",
        description="Text-driven image-to-image translation with Conditional Score Guidance (CSG, NeurIPS 2023).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("input")
    src.add_argument("--image", help="source image (any format/mode PIL reads; resized/cropped to fit the model)")
    src.add_argument("--demo", action="store_true",
                     help=f"use a built-in synthetic image with prompt {DEMO_PROMPT!r} and task {DEMO_TASK!r}")
    src.add_argument("--prompt", help="source prompt describing the image, e.g. 'a photo of a cat'")
    tgt = src.add_mutually_exclusive_group()
    tgt.add_argument("--task", help="'<source word>2<target words>', e.g. cat2dog or 'dog2dog with glasses'")
    tgt.add_argument("--target-prompt", help="the full target prompt (instead of --task)")
    src.add_argument("--source-word", help="word of the source prompt to edit (only with --target-prompt; default: first differing word)")
    src.add_argument("--inversion", metavar="FILE.npy", help="reuse an inverted latent saved with --save-inversion")
    src.add_argument("--size", type=int, help="short side the image is resized to (default: the model's native size)")
    src.add_argument("--manifest", metavar="FILE",
                     help="translate a dataset: JSONL or CSV with image, prompt, task|target_prompt, optional id, "
                          "seed and per-item settings (see csg_jax/dataset.py); outputs go to OUT/<id>/")
    src.add_argument("--input-dir", metavar="DIR",
                     help="translate every image file in DIR with --prompt and --task/--target-prompt (ids: file stems)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=SHAPES_MODEL,
                   help="diffusers-format folder, Hub id (needs network), 'shapes' (the shipped model trained on the "
                        "shapes world: one coloured shape on a background, 32x32) or 'tiny' (random weights, "
                        "made on first use: exercises every code path, pictures are noise)")
    m.add_argument("--cache", help="Orbax folder caching converted params (pods: convert once)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="activation dtype")
    runtime.add_cli_arguments(m)

    e = p.add_argument_group("method")
    e.add_argument("--config", help="YAML with edit settings (configs/*.yaml); flags override it")
    e.add_argument("--method", choices=["csg", "csg-no-mixup", "ddim", "p2p", "pix2pix-zero"],
                   help="csg (default), csg without mixup, plain DDIM (Eq. 3), or the baselines Prompt-to-Prompt "
                        "(its defaults: guidance 7.5, empty negative; configs/p2p.yaml) and Pix2Pix-Zero")
    e.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    e.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default 5.0)")
    e.add_argument("--posterior-guidance", type=float, help="lambda of the conditional score guidance, Eq. 15 (default 10)")
    e.add_argument("--negative", choices=["source", "empty"], help="negative prompt: the source prompt (official) or empty")
    e.add_argument("--mask-res", type=int, help="cross-attention resolution used for the mask (default latent size / 4)")
    e.add_argument("--delta", type=float, help="period of the cosine gate, Eq. 16 (default 1.5)")
    e.add_argument("--inversion-variant", choices=["standard", "official", "null-text"],
                   help="DDIM inversion: standard, the authors' N-2 step variant, or null-text (standard + per-step "
                        "optimised negative embeddings, any method)")
    e.add_argument("--null-text", action="store_true", help="same as --inversion-variant null-text")
    e.add_argument("--null-text-steps", type=int, help="null-text: Adam steps per timestep (default 10)")
    e.add_argument("--noise-regularization", action="store_true",
                   help="Pix2Pix-Zero's auto-correlation + KL regularisation of the inversion's noise (any method; "
                        "on by default for --method pix2pix-zero, as released)")
    e.add_argument("--no-noise-regularization", action="store_true",
                   help="plain DDIM inversion noise, e.g. for --method pix2pix-zero from the same latent as the others")
    b = p.add_argument_group("baselines (--method p2p / pix2pix-zero)")
    b.add_argument("--cross-replace-steps", type=float, help="p2p: fraction of steps with the source's cross-attention (0.8)")
    b.add_argument("--self-replace-steps", type=float, help="p2p: fraction of steps with the source's coarse self-attention (0.4)")
    b.add_argument("--local-blend", action="store_true", help="p2p: LocalBlend, keep the source outside the words' maps")
    b.add_argument("--blend-threshold", type=float, help="p2p: LocalBlend threshold (0.3)")
    b.add_argument("--blend-start", type=float,
                   help="p2p: LocalBlend acts from this fraction of the steps on (0.2, the null-text notebook; "
                        "the stable notebook: 0)")
    b.add_argument("--self-replace-layers", choices=["null-text", "stable", "scaled"],
                   help="p2p: self-attention layers replaced: <= 32x32 query pixels (null-text notebook, default), "
                        "<= 16x16 (stable notebook) or <= (latent/4)^2 (scaled with the image)")
    b.add_argument("--blend-layers", choices=["released", "resolution"],
                   help="p2p LocalBlend maps: the released layer set read as 16x16 maps (default), or the cross "
                        "layers at latent/4 resolution")
    b.add_argument("--blend-maps", choices=["released", "own"],
                   help="p2p LocalBlend target-word map: after replacement, as the released code (default), or the "
                        "target's own attention (the paper's description)")
    b.add_argument("--token-alignment", choices=["released", "similarity"],
                   help="p2p: target columns read the source's by seq_aligner's word-swap / refinement mapper "
                        "(default) or by CSG's embedding-similarity matching")
    b.add_argument("--equalizer-words", help="p2p: target-prompt words to re-weight (default: the target words)")
    b.add_argument("--equalizer-scale", type=float, help="p2p: factor on their cross-attention (1: off)")
    b.add_argument("--xa-guidance", type=float, help="pix2pix-zero: cross-attention guidance step (0.1)")
    b.add_argument("--source-sentences", metavar="FILE", help="pix2pix-zero: sentences about the source concept, one a line")
    b.add_argument("--target-sentences", metavar="FILE",
                   help="pix2pix-zero: sentences about the target concept (edit direction = difference of the mean "
                        "embeddings; default: target prompt - source prompt)")
    e.add_argument("--encode", choices=["mean", "sample"], help="VAE posterior mean (deterministic) or a seeded sample (official)")
    e.add_argument("--mixup", choices=["two-pass", "single-pass"], help="cross-attention mixup: official two passes or one pass")
    e.add_argument("--max-attention-store-gb", type=float, metavar="GB",
                   help="two-pass mixup: keep the source pass's cross-attention maps of every step when they take at "
                        "most GB per program (one UNet evaluation per step fewer; default 4), else recompute them "
                        "(memory flat in the steps); 0: always recompute")
    e.add_argument("--seed", type=int, help="seed (used by --encode sample)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default="out/translate", help="output folder (replaced atomically)")
    o.add_argument("--save-inversion", action="store_true", help="also write inversion.npy (x_T) for later edits")
    o.add_argument("--save-latents", action="store_true",
                   help="also write latents.npz (inverted, reconstruction, edited latents; mask_raw, mask)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")

    d = p.add_argument_group("datasets (--manifest / --input-dir)")
    d.add_argument("--batch-size", type=int, default=1, help="images per device per step; global batch = this x all devices")
    d.add_argument("--distributed", action="store_true",
                   help="multi-host run: jax.distributed.initialize() (auto-detects TPU pods, SLURM, Open MPI; "
                        "or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    return p


def edit_config_from_args(args):
    from csg_jax.editing.config import EditConfig

    config = EditConfig.from_yaml(args.config) if args.config else EditConfig.for_method(args.method or "csg")
    if getattr(args, "null_text", False):
        args.inversion_variant = "null-text"
    baseline = ("null_text_steps", "cross_replace_steps", "self_replace_steps", "blend_threshold", "blend_start",
                "self_replace_layers", "blend_layers", "blend_maps", "token_alignment", "equalizer_words",
                "equalizer_scale", "xa_guidance", "source_sentences", "target_sentences")
    flags = {name: getattr(args, name, None) for name in baseline}
    flags.update({name: True for name in ("local_blend", "noise_regularization") if getattr(args, name, False)})
    if getattr(args, "no_noise_regularization", False):
        flags["noise_regularization"] = False
    config = config.replace(**{k: v for k, v in flags.items() if v is not None})
    overrides = {
        "method": args.method, "num_steps": args.steps, "guidance_scale": args.guidance_scale,
        "posterior_guidance": args.posterior_guidance, "negative_prompt": args.negative, "mask_res": args.mask_res,
        "delta": args.delta, "inversion": args.inversion_variant, "encode": args.encode, "mixup": args.mixup,
        "seed": args.seed, "dtype": args.dtype if args.dtype != "float32" else None,
        "max_attention_store_gb": getattr(args, "max_attention_store_gb", None),
    }
    return config.replace(**{k: v for k, v in overrides.items() if v is not None})


def write_item_outputs(out_dir: str, result, config, *, model_info: dict, image_info: dict, timings: dict,
                       save_inversion: bool = False, save_latents: bool = False,
                       extra_meta: Optional[dict] = None) -> dict:
    """Write one edit's files (edit.png, reconstruction.png, mask.png, mask_raw.png, grid.png,
    meta.json; inversion.npy / latents.npz on request) into ``out_dir``, atomically: the folder
    appears only when complete (:class:`csg_jax.io.StagedDir`). Returns {file name: final path}.
    Used by the single-image CLI and by dataset runs (csg_jax/dataset.py)."""
    from csg_jax import io
    from csg_jax.editing.csg import unet_evaluations, unet_evaluations_per_step

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
            "settings": dataclasses.asdict(config),
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


def run(args) -> str:
    import jax.numpy as jnp
    from tqdm import tqdm

    from csg_jax import io
    from csg_jax.editing.editor import image_multiple, translate_image
    from csg_jax.errors import ImageError, PromptError
    from csg_jax.pipeline import load_pipeline, model_summary

    if args.demo:
        args.prompt = args.prompt or DEMO_PROMPT
        if not args.task and not args.target_prompt:
            args.task = DEMO_TASK
    if not args.prompt:
        raise PromptError("--prompt is required: describe the source image, e.g. --prompt 'a photo of a cat'")
    if not args.task and not args.target_prompt:
        raise PromptError("give --task (e.g. cat2dog) or --target-prompt")
    if not args.image and not args.demo and not args.inversion:
        raise ImageError("give --image PATH (or --demo, or --inversion FILE.npy)")
    config = edit_config_from_args(args)

    phases = tqdm(total=4, disable=args.quiet, desc="load model", bar_format="{desc:<22}{bar}| {n}/{total} [{elapsed}]")
    t0 = time.perf_counter()
    model = resolve_model(args.model)
    pipe = load_pipeline(model, dtype=getattr(jnp, config.dtype), param_dtype=getattr(jnp, config.dtype), cache=args.cache)  # bfloat16 layers cast their weights to bfloat16 anyway: keep them so (half the memory, no per-call cast)
    load_s = time.perf_counter() - t0
    phases.update()
    phases.set_description("read image")
    native = pipe.unet.config.sample_size * pipe.downsample
    size = args.size or native
    notices, image, inverted, null_embeddings = [], None, None, None
    if args.inversion:
        try:
            inverted = np.load(args.inversion)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot read the inversion file {args.inversion}: {e}") from None
        nulls = os.path.join(os.path.dirname(os.path.abspath(args.inversion)), "null_embeddings.npy")
        if config.inversion == "null-text" and os.path.isfile(nulls):
            null_embeddings = np.load(nulls)
    elif args.demo and not args.image:
        image = demo_image(size - size % image_multiple(pipe))
    else:
        image, notices = io.load_image(args.image, size, image_multiple(pipe))
    for n in notices:
        tqdm.write(f"note: {n}", file=sys.stderr)
    phases.update()
    phases.set_description(f"{config.method} edit (compile+run)")
    result = translate_image(pipe, image, args.prompt, task=args.task, target_prompt=args.target_prompt,
                             config=config, inverted=inverted, source_word=args.source_word,
                             null_embeddings=null_embeddings)
    for w in result.plan.warnings:
        tqdm.write(f"warning: {w}", file=sys.stderr)
    phases.update()
    phases.set_description("write outputs")

    paths = write_item_outputs(
        args.out, result, config, model_info={k: v for k, v in model_summary(pipe).items() if k != "unet"},
        image_info={"path": args.image, "demo": bool(args.demo and not args.image), "notices": notices,
                    "inversion_file": args.inversion, "size": list(result.edit.shape[:2])},
        timings={"load": load_s, **result.timings}, save_inversion=args.save_inversion,
        save_latents=args.save_latents)
    out = os.path.dirname(paths["meta.json"])
    phases.update()
    phases.close()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.configure_from_args(args)
    if args.manifest or args.input_dir:  # dataset mode: exit 0 all ok, 3 some items failed, 2 fatal
        from csg_jax.dataset import run_cli

        return run_guarded(lambda: run_cli(args), "finished items are in results.jsonl, rerun to resume")
    out = run_guarded(lambda: run(args), "no output written")
    if isinstance(out, int):
        return out
    print(f"wrote {out}: edit.png, reconstruction.png, mask.png, mask_raw.png, grid.png, meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
