"""UNet evaluations per image of an edit, by phase (benchmarks, meta.json).

A gradient (forward + backward through the UNet) counts as 1 + BACKWARD_COST evaluations; each
method's plug-in counts its own source and target passes (``unet_evaluations``).
"""

from __future__ import annotations

from csg_jax.editing import registry

BACKWARD_COST = 2  # a backward pass through the UNet counted as ~2 forward evaluations (reverse mode)


SOURCES = ("image", "inverted", "generated")


def unet_evaluations_per_step(config, stored_maps: bool = False, source: str = "image") -> dict:
    """{phase: UNet image-evaluations per image per step}: "inversion", the method's "source" and
    "target", and with inversion "null-text" its upper bound "null_text" (one conditional
    evaluation, at most ``null_text_steps`` gradients of the negative branch, one final negative
    evaluation; early stopping takes fewer). ``stored_maps``: CSG's two-pass mixup reads the
    source pass's stored cross-attention maps instead of re-evaluating the source branch.

    ``source`` (one of :data:`SOURCES`), where x_T comes from: "image" (inverted in this run);
    "inverted" (an inversion file: no inversion, nor null-text optimisation, is run); "generated"
    (drawn from a seed: no inversion, and the source pass samples with CFG on the empty prompt)."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: one of {SOURCES}")
    # the source pass is classifier-free guided by per-step negative contexts: null-text's, or the
    # empty prompt's of a generated image (csg_jax.editing.generate)
    guided = config.inversion == "null-text" or source == "generated"
    per = {"inversion": int(source == "image"),
           **registry.module(config.method).unet_evaluations(config, stored_maps, guided)}
    if config.inversion == "null-text" and source == "image":
        per["null_text"] = 2 + (1 + BACKWARD_COST) * int(config.null_text_steps)
    return per


def unet_evaluations(config, stored_maps: bool = False, source: str = "image") -> int:
    """Total per image: the inversion's steps (N - 2 for the official variant) and N of the rest."""
    per = unet_evaluations_per_step(config, stored_maps, source)
    n = config.num_steps
    inv = n - 2 if config.inversion == "official" else n
    return per["inversion"] * inv + sum(v for k, v in per.items() if k != "inversion") * n
