"""What a shapes-model run leaves on disk: Orbax checkpoints of the whole train state, and the
exported model (the EMA weights as a diffusers-format pixel model folder, optionally tarred).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from typing import Optional

import numpy as np

from csg_jax.shapes.train_config import SCALING_FACTOR
from csg_jax.shapes.train_data import shapes_words


class Checkpointer:
    """Orbax CheckpointManager (keep 2) of the whole TrainState plus a JSON of the config.

    State is copied to host before saving (the train step donates its input buffers, so device
    arrays handed to an async save could be deleted under it). A failing Orbax (version skew on
    another machine) disables checkpointing with a warning instead of killing the run: the
    periodic exports are what matter.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.enabled = True
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        if not self.enabled:
            return None
        try:
            return self.manager.latest_step()
        except Exception as e:
            self.enabled = False
            print(f"[ckpt] WARNING: cannot list checkpoints, checkpointing disabled: {e}", flush=True)
            return None

    def save(self, step: int, state, meta: dict) -> None:
        if not self.enabled:
            return
        import jax

        try:
            host = jax.device_get(state)
            args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(host),
                                           meta=self.ocp.args.JsonSave(meta))
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            self.enabled = False
            print(f"[ckpt] WARNING: saving failed, checkpointing disabled: {type(e).__name__}: {e}", flush=True)

    def restore(self, step: int, like):
        """(state, meta) of ``step``; ``like`` is a state with the right structure/shapes/dtypes."""
        import jax

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                       meta=self.ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return jax.tree.map(jax.numpy.asarray, out["state"]), dict(out["meta"])

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            print(f"[ckpt] WARNING: closing the checkpoint manager failed: {e}", flush=True)


def export_model(folder: str, configs: dict, ema_params: dict, step: int, words=None,
                 tar_path: Optional[str] = None, scaling_factor: float = SCALING_FACTOR,
                 base_steps: int = 0) -> str:
    """Write the EMA weights as a diffusers-format pixel model folder, atomically (a new folder is
    renamed over the old one), and optionally a tar of it (also atomic). Returns ``folder``.

    ``base_steps``: steps behind the weights the run started from (``--init-from``); the folder
    records ``trained_steps`` = base + step, and the split when there is a base."""
    import jax

    from csg_jax.testing import write_model_folder

    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(ema_params))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    meta = {"kind": "pixel", "scaling_factor": float(scaling_factor), "mask_res": 16,
            "trained_steps": int(base_steps) + int(step)}
    if base_steps:
        meta.update(init_steps=int(base_steps), trained_steps_this_run=int(step))
    write_model_folder(tmp, configs, host, words=words or shapes_words(), csg_jax_meta=meta,
                       weight_dtype=np.float16)
    for root, dirs, files in os.walk(tmp):  # mkdtemp makes 0700; make it an ordinary folder
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    old = None
    if os.path.exists(folder):
        old = folder + f".old-{os.getpid()}"
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if tar_path:
        tar_folder(folder, tar_path)
    return folder


def tar_folder(folder: str, tar_path: str) -> None:
    """Uncompressed tar of ``folder`` (arcname = its base name), written to a temp file and renamed."""
    tar_path = os.path.abspath(tar_path)
    os.makedirs(os.path.dirname(tar_path), exist_ok=True)
    tmp = tar_path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        tf.add(folder, arcname=os.path.basename(folder.rstrip("/")))
    os.replace(tmp, tar_path)


def trained_steps_of(folder: str) -> int:
    """Training steps behind a model folder (its model_index.json's ``csg_jax.trained_steps``;
    0 if it does not say)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            return int(json.load(f).get("csg_jax", {}).get("trained_steps", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
