"""The editing methods: name -> plug-in module (and the settings a name implies).

A plug-in module exports the same small surface (``tests/identity_method.py`` is the smallest):

* ``Options`` -- a frozen dataclass of :func:`~csg_jax.editing.schema.knob` fields nested in
  :class:`~csg_jax.editing.config.EditConfig` under ``OPTIONS_KEY`` (or ``Options = None``);
* ``DEFAULTS`` -- the method's published settings where they differ from the shared defaults;
* ``knobs(config)`` -- its ``batch`` settings as arrays (a pytree, or None);
* ``prepare(pipe, prompts, config)`` -- host-side changes to the batched :class:`Prompts`;
* ``plan(pipe, latent_hw, layers, config)`` -- what the compiled edit needs to know about the
  layers (static; ``layers`` is the shared :class:`~csg_jax.editing.core.LayerPlan`);
* ``edit(run, x_T, prompts, knobs, method_knobs, uncond) -> EditOutputs`` -- the traced edit,
  ``run`` an :class:`~csg_jax.editing.core.EditRun`; with Direct Inversion ``run.source_path``
  holds the latents the method's source branch ends each step on (:func:`~csg_jax.editing.core.follow`);
  a plug-in that ignores it edits as after a standard inversion;
* ``unet_evaluations(config, stored_maps, guided) -> {"source": n, "target": n}`` per image and
  step; ``guided``: the source pass is classifier-free guided by per-step negative contexts.

Adding a method is one module plus one line in :data:`METHODS` (or :func:`register` at run time,
for a plug-in without ``Options``). No other module tests a method's name.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from csg_jax.errors import ConfigError


class Entry(NamedTuple):
    module: str  # import path of the plug-in
    implies: tuple = ()  # ((setting, value), ...) forced by the name (ablations of one plug-in)
    summary: str = ""


METHODS: dict[str, Entry] = {
    "csg": Entry("csg_jax.editing.csg", (), "Conditional Score Guidance (Algorithm 1)"),
    "csg-no-mixup": Entry("csg_jax.editing.csg", (("mixup", "none"),), "CSG without the cross-attention mixup"),
    "ddim": Entry("csg_jax.editing.csg", (("mixup", "none"), ("score_guidance", False)),
                  "plain DDIM from the inverted latent (Eq. 3)"),
    "p2p": Entry("csg_jax.editing.p2p", (), "Prompt-to-Prompt, as Google released it"),
    "pix2pix-zero": Entry("csg_jax.editing.pix2pix_zero", (), "Pix2Pix-Zero, as released"),
}


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def entry(name: str) -> Entry:
    if name not in METHODS:
        raise ConfigError(f"method={name!r} is not supported; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def module(name: str) -> ModuleType:
    """The plug-in module of method ``name``."""
    return importlib.import_module(entry(name).module)


def modules() -> list[ModuleType]:
    """Every plug-in module once, in registry order."""
    return [importlib.import_module(m) for m in dict.fromkeys(e.module for e in METHODS.values())]


def register(name: str, module_path: str, implies: tuple = (), summary: str = "") -> None:
    """Add a method at run time (tests, user plug-ins). Its module's ``Options`` must be None:
    option groups are part of :class:`EditConfig`, built when the config module is imported."""
    mod = importlib.import_module(module_path)
    if getattr(mod, "Options", None) is not None and mod not in modules():
        raise ConfigError(f"{module_path} declares Options: add it to csg_jax/editing/registry.py's METHODS instead")
    METHODS[name] = Entry(module_path, tuple(implies), summary)
