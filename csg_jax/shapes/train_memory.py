"""Fitting the shapes model's train step to the device's memory: the residuals each remat mode
keeps, the device's limit, the least remat that fits, and the batch-halving fallbacks.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from csg_jax.shapes.train_config import LOC_WORDS, TrainConfig
from csg_jax.shapes.train_step import REMAT_MODES, make_loss_fn

MIN_BATCH = 8  # out-of-memory fallbacks halve the batch down to this


def residual_bytes(cfg: TrainConfig, unet, text, params, remat: str) -> int:
    """Bytes the backward pass keeps from the forward pass at ``cfg.batch_size`` (tracing only)."""
    import jax
    import jax.numpy as jnp

    B, c = cfg.batch_size, unet.config
    x = jax.ShapeDtypeStruct((B, c.sample_size, c.sample_size, c.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((B,), jnp.int32)
    ids = jax.ShapeDtypeStruct((B, 77), jnp.int32)
    loss_fn = make_loss_fn(cfg, unet, text, remat)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    loc = None
    if cfg.loc_weight > 0:
        loc = (jax.ShapeDtypeStruct((B, len(LOC_WORDS)), jnp.int32),
               jax.ShapeDtypeStruct((B, c.sample_size, c.sample_size), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.float32))

    def backward(p, x, t, ids, loc):
        return jax.vjp(lambda q: loss_fn(q, x, t, ids, x, None, loc)[0], p)[1]

    vjp = jax.eval_shape(backward, abstract, x, t, ids, loc)
    return int(sum(np.prod(l.shape) * np.dtype(l.dtype).itemsize for l in jax.tree.leaves(vjp)))


def memory_limit() -> Optional[int]:
    """Bytes JAX may use on the default device (GPU/TPU allocator limit), else half the available
    host RAM (a CPU run shares the machine)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (ValueError, OSError, AttributeError):
        return None


def choose_remat(cfg: TrainConfig, unet, text, params, limit: Optional[int], fraction: float = 0.45) -> str:
    """Least rematerialisation whose residuals fit in ``fraction`` of ``limit`` (the rest is
    for the transients of the backward pass); "full" if none does."""
    for mode in REMAT_MODES[:-1]:
        need = residual_bytes(cfg, unet, text, params, mode)
        print(f"[remat] {mode}: {need / 2**30:.2f} GiB of residuals at batch {cfg.batch_size}", flush=True)
        if limit is None or need <= fraction * limit:
            return mode
    return REMAT_MODES[-1]


def _fitting_batch(batch_size: int, need: int, limit: Optional[int], fraction: float = 0.9) -> int:
    """The batch, halved until XLA's estimate (scaled linearly) fits ``fraction`` of the limit."""
    while limit and need > fraction * limit and batch_size // 2 >= MIN_BATCH:
        batch_size //= 2
        need //= 2
    return batch_size


def _memory_estimate(compiled, limit: Optional[int]) -> int:
    """Bytes XLA plans for the compiled step (0 if unknown); printed with the device limit."""
    try:
        m = compiled.memory_analysis()
        need = int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)
        gib = lambda b: b / 2**30
        print(f"[compile] step memory: args {gib(m.argument_size_in_bytes):.2f} GiB, temp "
              f"{gib(m.temp_size_in_bytes):.2f} GiB" + (f"; limit {gib(limit):.1f} GiB" if limit else ""),
              flush=True)
        return need
    except Exception:
        return 0


def _is_oom(e: Exception) -> bool:
    s = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s
