"""Where the shipped shapes model lives, and how it gets there.

The trained text-to-image model (a diffusers-format "pixel" folder exported by
:func:`csg_jax.shapes.checkpoint.export_model`) ships as ``csg_jax/shapes/assets/shapes_model/`` with
a ``CHECKSUM`` file beside it: the sha256 of its weights (:func:`checksum`), written by
:func:`ship_model`, so that a test can tell a complete, unaltered copy from a stale one.
"""

from __future__ import annotations

import hashlib
import os
import shutil

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack")


def shipped_model_dir() -> str:
    """The shipped model folder (may be absent in a checkout without the trained model)."""
    return os.path.join(ASSETS, "shapes_model")


def installed_model_dir() -> str:
    """:func:`shipped_model_dir`, checked to hold a model (the ``--model shapes`` hook of
    :mod:`csg_jax.model_zoo`)."""
    from csg_jax.errors import CheckpointError

    folder = shipped_model_dir()
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CheckpointError(f"the shipped shapes model is missing from this install ({folder}); "
                              "reinstall csg_jax, or pass --model tiny or --model /path/to/model")
    return folder


def checksum_file(folder: str) -> str:
    """The CHECKSUM file that belongs to ``folder`` (next to it, not inside: it is not model data)."""
    return os.path.join(os.path.dirname(os.path.abspath(folder)), "CHECKSUM")


def weight_files(folder: str) -> list[str]:
    """Relative paths of the weight files under ``folder``, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def checksum(folder: str) -> str:
    """sha256 (hex) over the weight files of ``folder``: each relative path, then its bytes."""
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {folder}")
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(folder, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def ship_model(src_folder: str, dest: str | None = None) -> str:
    """Copy a trained export into the assets (replacing what is there) and write its CHECKSUM.

    Returns the checksum. The copy is made beside ``dest`` and renamed over it, so an
    interrupted ship never leaves half a model.
    """
    from csg_jax.pipeline import load_pipeline

    dest = os.path.abspath(dest or shipped_model_dir())
    if not os.path.exists(os.path.join(src_folder, "model_index.json")):
        raise FileNotFoundError(f"{src_folder} is not a diffusers model folder (no model_index.json)")
    tmp = dest + ".incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_folder, tmp)
    load_pipeline(tmp)  # refuse to ship something that does not load
    digest = checksum(tmp)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    with open(checksum_file(dest), "w") as f:
        f.write(digest + "\n")
    return digest


def recorded_checksum(folder: str | None = None) -> str:
    """The checksum written by :func:`ship_model` for ``folder`` (default: the shipped model)."""
    with open(checksum_file(folder or shipped_model_dir())) as f:
        return f.read().strip()
