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
import os
import sys
import time
from typing import Optional

import numpy as np

from csg_jax import runtime
from csg_jax.errors import run_guarded

from csg_jax.model_zoo import DEMO_PROMPT, DEMO_TASK, SHAPES_MODEL, demo_image, resolve_model


def inversion_kinds() -> tuple:
    """The choices of the ``inversion`` setting (``--inversion KIND`` takes them)."""
    from csg_jax.editing.config import EditConfig

    return {f.name: f for f in dataclasses.fields(EditConfig)}["inversion"].metadata["choices"]


def _settings_titles() -> dict:
    """Argument-group titles: the shared settings, then one group per method's options."""
    from csg_jax.editing import schema
    from csg_jax.editing.config import EditConfig

    titles = {None: "edit settings (any method; --config YAML gives them too, flags override it)"}
    for f in dataclasses.fields(EditConfig):
        if schema.is_group(f):
            titles[f.name] = (f.default_factory.__doc__ or f.name).strip().splitlines()[0]
    return titles


def build_parser() -> argparse.ArgumentParser:
    from csg_jax.editing import schema
    from csg_jax.editing.config import EditConfig

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
    src.add_argument("--inversion", metavar="KIND|FILE.npy",
                     help=f"an inversion kind ({', '.join(inversion_kinds())}; same as --inversion-variant), or an "
                          "inverted latent saved with --save-inversion to edit again")
    src.add_argument("--generate", metavar="PROMPT",
                     help="edit a generated image: sample the source from x_T (drawn from --seed) on PROMPT, then "
                          "edit it from the same x_T, no inversion (as the official edit_synthetic_images.py: CFG with the "
                          "empty negative prompt; --posterior-guidance defaults to its 0.1)")
    src.add_argument("--size", type=int, help="short side the image is resized to (default: the model's native size)")
    src.add_argument("--manifest", metavar="FILE",
                     help="translate a dataset: JSONL or CSV with image, prompt, task|target_prompt, optional id, "
                          "seed and per-item settings (see csg_jax/dataset/), or PIE-Bench's mapping_file.json; "
                          "outputs go to OUT/<id>/")
    src.add_argument("--images", metavar="DIR",
                     help="with --manifest mapping_file.json (PIE-Bench): the folder its image_path entries are "
                          "relative to (default: annotation_images/ next to the mapping file, else its folder)")
    src.add_argument("--input-dir", metavar="DIR",
                     help="translate every image file in DIR with --prompt and --task/--target-prompt (ids: file stems)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=SHAPES_MODEL,
                   help="diffusers-format folder, Hub id (needs network), 'shapes' (the shipped model trained on the "
                        "shapes world: one coloured shape on a background, 32x32) or 'tiny' (random weights, "
                        "made on first use: exercises every code path, pictures are noise)")
    m.add_argument("--cache", help="Orbax folder caching converted params (pods: convert once)")
    runtime.add_cli_arguments(m)

    e = p.add_argument_group("configuration")
    e.add_argument("--config", help="YAML with edit settings (configs/*.yaml); flags override it")
    e.add_argument("--null-text", action="store_true", help="same as --inversion-variant null-text")
    schema.add_arguments(p, EditConfig, _settings_titles())

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


def _split_inversion(args) -> None:
    """``--inversion KIND`` (a setting: ``args.inversion_kind``) apart from ``--inversion FILE.npy``
    (a saved x_T: ``args.inversion``)."""
    kind = args.inversion if getattr(args, "inversion", None) in inversion_kinds() else None
    args.inversion_kind = kind
    if kind:
        args.inversion = None


def edit_config_from_args(args):
    """The EditConfig of parsed flags: ``--config`` YAML (else the method's own defaults), then
    every setting flag given."""
    from csg_jax.editing import schema
    from csg_jax.editing.config import EditConfig

    given = schema.given_arguments(args)
    if getattr(args, "null_text", False):
        given["inversion"] = "null-text"
    if getattr(args, "inversion_kind", None):
        given["inversion"] = args.inversion_kind
    config = EditConfig.from_yaml(args.config) if args.config else EditConfig.for_method(given.get("method", "csg"))
    return config.replace(**given)


def _load_pipeline(args, config):
    import jax.numpy as jnp

    from csg_jax.pipeline import load_pipeline, model_summary

    t0 = time.perf_counter()
    dtype = getattr(jnp, config.dtype)  # bfloat16 layers cast their weights anyway: keep them so (half the memory)
    pipe = load_pipeline(resolve_model(args.model), dtype=dtype, param_dtype=dtype, cache=args.cache)
    return pipe, {k: v for k, v in model_summary(pipe).items() if k != "unet"}, time.perf_counter() - t0


def run(args) -> str:
    from tqdm import tqdm

    from csg_jax import io
    from csg_jax.editing.editor import image_multiple, translate_image
    from csg_jax.errors import ImageError, PromptError
    from csg_jax.outputs import write_item_outputs

    if args.generate:
        return _run_generate(args)
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
    if args.images:
        raise ImageError("--images goes with --manifest mapping_file.json (PIE-Bench)")
    config = edit_config_from_args(args)

    phases = tqdm(total=4, disable=args.quiet, desc="load model", bar_format="{desc:<22}{bar}| {n}/{total} [{elapsed}]")
    pipe, model_info, load_s = _load_pipeline(args, config)
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
        args.out, result, config, model_info=model_info,
        image_info={"path": args.image, "demo": bool(args.demo and not args.image), "notices": notices,
                    "inversion_file": args.inversion, "size": list(result.edit.shape[:2])},
        timings={"load": load_s, **result.timings}, save_inversion=args.save_inversion,
        save_latents=args.save_latents)
    out = os.path.dirname(paths["meta.json"])
    phases.update()
    phases.close()
    return out


def _run_generate(args) -> str:
    from csg_jax.editing.generate import edit_generated, generation_config
    from csg_jax.errors import CSGError, PromptError
    from csg_jax.outputs import write_item_outputs

    if args.image or args.demo or args.inversion or args.prompt:
        raise CSGError("--generate PROMPT replaces --image, --demo, --inversion FILE and --prompt")
    if not args.task and not args.target_prompt:
        raise PromptError("give --task (e.g. cat2dog) or --target-prompt for the generated image")
    from csg_jax.editing import schema

    config = generation_config(edit_config_from_args(args), tuple(schema.given_arguments(args)))
    pipe, model_info, load_s = _load_pipeline(args, config)
    result = edit_generated(pipe, args.generate, args.task, args.target_prompt, config, seed=config.seed,
                            size=args.size, source_word=args.source_word)
    for w in result.plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    paths = write_item_outputs(
        args.out, result, config, model_info=model_info,
        image_info={"generated": {"prompt": args.generate, "seed": config.seed}, "size": list(result.edit.shape[:2])},
        timings={"load": load_s, **result.timings}, save_inversion=args.save_inversion,
        save_latents=args.save_latents, source_png=True)
    return os.path.dirname(paths["meta.json"])


def run_dataset(args) -> int:
    """``--manifest ... | --input-dir ...`` (:mod:`csg_jax.dataset`): exit 0 all ok, 3 some failed."""
    from csg_jax.dataset import DatasetRun, format_summary, maybe_initialize_distributed, read_manifest, scan_folder
    from csg_jax.errors import CSGError

    distributed = maybe_initialize_distributed(args.distributed)
    import jax

    if args.image or args.demo or args.generate or args.inversion:
        raise CSGError("--manifest / --input-dir replace --image, --demo, --generate and --inversion FILE")
    if args.manifest and args.input_dir:
        raise CSGError("give --manifest or --input-dir, not both")
    config = edit_config_from_args(args)
    if args.manifest:
        if args.prompt or args.task or args.target_prompt:
            raise CSGError("with --manifest the prompts come from the manifest; drop --prompt/--task/--target-prompt")
        items = read_manifest(args.manifest, images=args.images)
    else:
        if args.images:
            raise CSGError("--images goes with --manifest mapping_file.json (PIE-Bench)")
        items = scan_folder(args.input_dir, args.prompt, args.task, args.target_prompt, args.source_word)
    pipe, model_info, load_s = _load_pipeline(args, config)
    gen_config = None
    if any(it.generate for it in items):  # the flags given keep their values for generated items too
        from csg_jax.editing import schema
        from csg_jax.editing.generate import generation_config

        try:
            gen_config = generation_config(config, tuple(schema.given_arguments(args)))
        except CSGError as e:  # (each generated item then records it)
            items = [it.with_error(str(e)) if it.generate and it.error is None else it for it in items]
    run = DatasetRun(pipe, items, config, args.out, batch_size=args.batch_size, size=args.size,
                     save_inversion=args.save_inversion, save_latents=args.save_latents, quiet=args.quiet,
                     model_info=model_info, load_s=load_s, generate_config=gen_config)
    summary = run.run()
    if jax.process_index() == 0:
        print(format_summary(summary), flush=True)
    if distributed:
        jax.distributed.shutdown()
    return 0 if summary["failed"] == 0 else 3


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _split_inversion(args)
    runtime.configure_from_args(args)
    if args.manifest or args.input_dir:  # dataset mode: exit 0 all ok, 3 some items failed, 2 fatal
        return run_guarded(lambda: run_dataset(args), "finished items are in results.jsonl, rerun to resume")
    out = run_guarded(lambda: run(args), "no output written")
    if isinstance(out, int):
        return out
    print(f"wrote {out}: edit.png, reconstruction.png, mask.png, mask_raw.png, grid.png, meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
