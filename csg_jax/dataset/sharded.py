"""Devices and hosts: the ("data",) mesh, multi-host start-up, global arrays, the sharded program."""

from __future__ import annotations

import os

import numpy as np


def maybe_initialize_distributed(flag: bool) -> bool:
    """``jax.distributed.initialize()`` when asked (``--distributed``) or when JAX_COORDINATOR_ADDRESS is set.

    Cloud TPU pods, SLURM, Open MPI and Kubernetes are auto-detected by JAX; elsewhere set
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before
    anything touches a JAX device. CPU runs use gloo collectives (JAX's default).
    """
    env = os.environ
    if not flag and not env.get("JAX_COORDINATOR_ADDRESS"):
        return False
    import jax

    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    return True


def make_mesh(devices=None):
    """A one-axis ``("data",)`` mesh over all devices, each host's devices contiguous."""
    import jax
    from jax.sharding import Mesh

    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def local_rows(sharding, global_batch: int) -> tuple[int, int]:
    """[lo, hi) rows of a global batch held by this host's devices (contiguous by construction)."""
    idx = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch) for s in idx.values())
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise RuntimeError("this host's devices do not hold a contiguous block of the batch")
    return lo, hi


def _to_global(x: np.ndarray, sharding, global_shape):
    import jax

    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, global_shape)


def _local_rows_of(arr) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order."""
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # (replicas of a row block on several local devices: take one)
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def batch_fn(editor, mesh, sample: bool, generate: bool = False):
    """``jit(shard_map(editor.program))`` over ``mesh``'s "data" axis: each device runs exactly
    the single-device :meth:`~csg_jax.editing.editor.Editor.program` on its rows.

    ``f(params, images (G, H, W, 3), keys (G, 2) | None, prompts (G, ...), knobs (G,), method_knobs
    (scalars) | None, rng (2,) | None)`` -> the program's dict of (G, ...) arrays (``method_knobs``
    and ``rng``, the noise-regularisation key, are replicated). Held by the editor, per mesh.
    ``generate``: :meth:`~csg_jax.editing.editor.Editor.generate_program` instead, ``f(params,
    x_T (G, h, w, C), prompts, knobs, method_knobs)``.
    """
    import jax
    from jax.sharding import PartitionSpec as P

    def make():
        data = P("data")
        if generate:
            return jax.jit(jax.shard_map(editor.generate_program, mesh=mesh, in_specs=(P(), data, data, data, P()),
                                         out_specs=data, check_vma=False))
        return jax.jit(jax.shard_map(editor.program, mesh=mesh, in_specs=(P(), data, data, data, data, P(), P()),
                                     out_specs=data, check_vma=False))

    return editor.sharded((sample, generate, tuple(d.id for d in mesh.devices.flat)), make)
