"""Which model folder a ``--model`` name means, and the built-in demo picture.

Named models are a table of hooks (``"module:function"``, imported on use), so the core never
imports the toy ``shapes`` package: ``shapes`` (default) is the shipped trained shapes-world
model, ``tiny`` / ``embedded`` a random SD-1-shaped model made on first use. Anything else is a
diffusers folder or Hub id, passed through.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

SHAPES_MODEL = "shapes"  # the trained shapes-world model shipped in csg_jax/shapes/assets
TINY_MODEL = "tiny"  # a random SD-1-shaped model made on first use (every code path, noise pictures)
DEMO_PROMPT = "a red circle on a blue background"
DEMO_TASK = "circle2square"
# name -> "module:function() -> folder"; the shipped model's hook checks it is complete
MODELS = {SHAPES_MODEL: "csg_jax.shapes.model:installed_model_dir",
          TINY_MODEL: "csg_jax.model_zoo:embedded_model_dir", "embedded": "csg_jax.model_zoo:embedded_model_dir"}
DEMO_IMAGE = "csg_jax.shapes.world:demo_image"  # (size) -> (size, size, 3) uint8 picture of DEMO_PROMPT


def _hook(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def embedded_model_dir() -> str:
    """The tiny random model: made once (deterministically) under $CSG_JAX_HOME or ~/.cache/csg_jax."""
    from csg_jax.testing import make_tiny_model

    home = os.environ.get("CSG_JAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "csg_jax")
    folder = os.path.join(home, "models", "tiny-sd1-v1")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        tmp = folder + f".partial-{os.getpid()}"
        make_tiny_model(tmp, "sd1", seed=0)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(name: str) -> str:
    """The folder (or Hub id) behind ``--model``: a name of :data:`MODELS`, or a path / Hub id."""
    return _hook(MODELS[name])() if name in MODELS else name


def demo_image(size: int) -> np.ndarray:
    """The demo picture (a red circle on a textured blue background), (size, size, 3) uint8."""
    return _hook(DEMO_IMAGE)(size)
