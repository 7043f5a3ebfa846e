"""Buckets and batches: items grouped by what shapes the compiled program, cut into global batches.

A bucket is (static config, VAE sampling on/off, image size, the ``batch`` settings); its items
are cut into batches of ``batch_size x devices``, the last padded by repeating its last item.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Sequence

import numpy as np

from csg_jax.dataset.manifest import Item


@dataclasses.dataclass(frozen=True)
class Bucket:
    """What shapes the compiled program: static config, VAE sampling, image size (H, W)."""

    config: Any  # EditConfig.static()
    sample: bool
    hw: tuple[int, int]
    constants: tuple = ()  # settings one batch shares (baselines' knobs): ((name, value), ...)
    generate: bool = False  # generated sources (x_T in, no inversion): another program

    def label(self) -> str:
        c = self.config
        return (f"{self.hw[0]}x{self.hw[1]} {c.method} {c.num_steps} steps" + (" sample" if self.sample else "")
                + (" generate" if self.generate else ""))


@dataclasses.dataclass
class Batch:
    bucket: Bucket
    items: list  # [(Item, EditConfig)], 1..global_batch real items
    number: int = 0

    def slots(self, size: int) -> list:
        """``size`` slots: the items, then the last item repeated (padding)."""
        return self.items + [self.items[-1]] * (size - len(self.items))


def batch_constants(config) -> tuple:
    """The ``batch`` settings (:mod:`csg_jax.editing.schema`): one compiled call takes them as
    scalars, so items that differ in them go to different buckets (same program, no
    recompilation); and the seed under noise regularisation (one key per call draws the rolls)."""
    from csg_jax.editing.config import fields_of_kind

    out = tuple((name, getattr(config, name)) for name in fields_of_kind("batch"))
    if config.noise_regularization:
        out += (("seed", config.seed),)
    return out


def plan_batches(entries: Iterable[tuple[Item, Any, tuple[int, int]]], global_batch: int) -> list[Batch]:
    """Group (item, config, image size) into buckets (in order of first appearance) and cut them
    into batches of at most ``global_batch`` items (manifest order inside a bucket)."""
    buckets: dict[Bucket, list] = {}
    for item, config, hw in entries:
        key = Bucket(config.static(), config.encode == "sample" and not item.generate, tuple(hw),
                     batch_constants(config), item.generate)
        buckets.setdefault(key, []).append((item, config))
    batches = []
    for key, members in buckets.items():
        for i in range(0, len(members), global_batch):
            batches.append(Batch(key, members[i : i + global_batch], len(batches)))
    return batches


def plan_digest(batches: Sequence[Batch], errors: Sequence[Item]) -> np.ndarray:
    """A fingerprint of the batch plan, so hosts can check that they agree."""
    h = hashlib.sha256()
    for b in batches:
        h.update(repr((b.bucket.label(), [it.id for it, _ in b.items])).encode())
    h.update(repr([it.index for it in errors]).encode())
    return np.frombuffer(h.digest()[:16], np.int32).copy()
