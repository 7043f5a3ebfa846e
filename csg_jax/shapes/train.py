"""Train a small Stable-Diffusion-shaped text-to-image model on the shapes world, in pixel space.

The model is the real thing in miniature: our :class:`~csg_jax.models.unet.UNet2DConditionModel`
and :class:`~csg_jax.models.clip_text.CLIPTextModel`, trained jointly from scratch, exported in
the diffusers on-disk format with ``model_index.json`` declaring ``"csg_jax": {"kind": "pixel"}``
(no VAE: the "latent" is the 32x32 RGB image in [-1, 1] times ``scaling_factor``), so
:func:`csg_jax.pipeline.load_pipeline` and the CSG editor load it like any SD checkpoint.

Choices that made a prototype follow the caption (with raw [-1, 1] pixels, SD betas and epsilon
prediction it ignored the text):

* no leak of the image at the last timestep: first SD's betas with images scaled by 0.18215 like
  SD latents, now (the default) the cosine schedule on [-1, 1] images, which also keeps enough
  signal at most timesteps for the shapes to be learned (see ``train_config.RECIPES``);
* v-prediction;
* the text encoder's token embeddings start with std 1 (not Flax's default 1/sqrt(64));
* classifier-free-guidance dropout: the caption is replaced by "" with probability 0.1.

This module is the run: :func:`train` sets up (scene pool, model, checkpoints, resume), compiles
the step to fit the device, runs the steps (time budget, stop signals, logging, periodic
checkpoints and exports) and writes the final checkpoint and export. Its parts live in
:mod:`.train_config` (the recipe), :mod:`.train_data` (pool and captions), :mod:`.train_model`
(architecture, parameters), :mod:`.train_step` (loss and step), :mod:`.train_memory` (fitting
the device), :mod:`.checkpoint` (checkpoints, export) and :mod:`.train_loop` (log, progress
bar, stop signals).

Entry point: :func:`train` (``scripts/train_shapes.py`` is its CLI).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from csg_jax.shapes.checkpoint import Checkpointer, export_model, trained_steps_of
from csg_jax.shapes.train_config import IMAGE_SIZE, TrainConfig, check_recipe
from csg_jax.shapes.train_data import PoolJob, caption_rows, caption_table, edge_bands, shapes_words
from csg_jax.shapes.train_loop import _Log, _progress, _samples_per_s, _StopRequest, _wait_for_older_steps
from csg_jax.shapes.train_memory import MIN_BATCH, _fitting_batch, _is_oom, _memory_estimate, choose_remat, memory_limit
from csg_jax.shapes.train_model import build_models, load_params_from_folder, model_configs
from csg_jax.shapes.train_step import init_state, make_optimizer, make_train_step


@dataclasses.dataclass
class RunOptions:
    """How to run (not part of the model's recipe)."""

    out: str  # checkpoint directory
    export: Optional[str] = None  # diffusers folder written at the end and every export_every s
    export_tar: Optional[str] = None  # tar of the export folder, rewritten with every export
    log: Optional[str] = None  # JSON-lines log; default <out>/train_log.jsonl
    time_budget_s: Optional[float] = None  # wall-clock budget from process start (pool, compile included)
    fit_schedule: bool = True  # with a budget: shrink the LR horizon to the steps that fit
    calibrate_steps: int = 100  # steps timed (after the first) before fitting the horizon
    export_every_s: float = 0.0  # 0: export only at the end
    ckpt_every: int = 1000
    log_every: int = 50
    workers: Optional[int] = None  # pool worker processes (default: cores - 1)
    progress: bool = True
    reserve_s: float = 20.0  # budget kept back for the final checkpoint + export
    compile_cache: Optional[str] = None  # JAX persistent compilation cache directory
    init_from: Optional[str] = None  # diffusers folder whose weights start a new run (ignored on resume)


@dataclasses.dataclass
class _Run:
    """What one :func:`train` call sets up once (only ``lineage`` changes, on resume / init)."""

    cfg: TrainConfig
    opts: RunOptions
    t0: float  # perf_counter() when the budget clock started
    log: _Log
    pool_job: PoolJob
    configs: dict  # config.json contents of each component
    words: list  # tokenizer words
    table_captions: list  # the K captions of the caption table
    tables: dict  # on the device: {"tokens": (K, 77) int32, "words": (K, len(LOC_WORDS)) int32}
    unet: Any
    text: Any
    tx: Any  # the optax AdamW direction
    ckpt: Optional[Checkpointer]
    lineage: dict = dataclasses.field(default_factory=lambda: {"base_steps": 0})  # steps behind the
    # --init-from weights (kept in the checkpoints)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


@dataclasses.dataclass
class _Compiled:
    """The train step compiled ahead of time, and what for."""

    cfg: TrainConfig  # the run's config with the batch size and remat mode compiled for
    fn: Callable  # (state, pool, tables) -> (state, metrics)
    seconds: float  # compile time


@dataclasses.dataclass
class _Loop:
    """Where the step loop is."""

    state: Any  # the TrainState
    step: int
    start_step: int  # step of the state this process started from
    target: int  # step to stop at (lowered when the LR horizon is fitted to the budget)
    compiled: _Compiled  # rebuilt at half the batch if the first step runs out of memory
    bar: Any  # tqdm bar or None
    last_export: float  # perf_counter() of the last export (or of the loop's start)
    pending: list = dataclasses.field(default_factory=list)  # device metrics not yet fetched
    # (fetching syncs, so only every log_every)
    exported_step: Optional[int] = None
    t_first: Optional[float] = None  # when this process's first step finished (excludes its wait)
    fitted: bool = False  # LR horizon fitted to the budget
    stop_reason: str = "steps"


def train(cfg: TrainConfig, opts: RunOptions, t_start: Optional[float] = None) -> dict:
    """Run (or resume) training; returns a summary dict. ``t_start``: when the budget clock
    started (default: now); the CLI passes its own start time so imports count."""
    run = _set_up(cfg, opts, time.perf_counter() if t_start is None else t_start)  # 1.
    import jax

    state, resumed_from = _fresh_state(run)  # 2.
    n_params = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in state.params.items()}
    print(f"[model] params: {n_params}", flush=True)
    start_step = int(state.step)
    compiled = _compile_fitting(run, state)  # 3. (the pool is still rendering)
    pool, rate = _pool_to_device(run)  # 4.
    run.log.write(event="start", step=start_step, elapsed=round(run.elapsed(), 2), resumed_from=resumed_from,
                  batch_size=compiled.cfg.batch_size, remat=compiled.cfg.remat, compile_s=round(compiled.seconds, 2),
                  pool_s=round(run.pool_job.seconds, 2), pool_rate=round(rate, 1),
                  devices=[str(d) for d in jax.devices()])

    target = max(cfg.steps, start_step)  # 5. Train.
    loop = _Loop(state=state, step=start_step, start_step=start_step, target=target, compiled=compiled,
                 bar=_progress(target, start_step, opts.progress), last_export=time.perf_counter())
    t_end_train = _run_steps(run, loop, pool)
    _finish(run, loop)  # 6.
    summary = _summary(run, loop, resumed_from, rate, t_end_train)
    run.log.write(event="end", **summary)
    run.log.close()
    return summary


def _set_up(cfg: TrainConfig, opts: RunOptions, t0: float) -> _Run:
    """1. The log; the scene pool's rendering, started right away (it overlaps with imports, init
    and compilation); JAX; the model, caption table, optimiser and checkpointer."""
    os.makedirs(opts.out, exist_ok=True)
    log = _Log(opts.log or os.path.join(opts.out, "train_log.jsonl"))
    pool_job = PoolJob(cfg.pool_size, cfg.seed, opts.workers)
    print(f"[pool] rendering {cfg.pool_size} scenes with {pool_job.workers} worker processes", flush=True)

    import jax
    import jax.numpy as jnp

    if opts.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(opts.compile_cache))
    print(f"[jax] {jax.__version__} devices={jax.devices()}", flush=True)
    configs = model_configs(beta_schedule=cfg.beta_schedule)
    words = shapes_words()
    table_captions, tables = caption_table(words, configs["text_encoder"]["vocab_size"])
    tables = {k: jnp.asarray(v) for k, v in tables.items()}
    unet, text = build_models(configs, cfg.dtype)
    return _Run(cfg=cfg, opts=opts, t0=t0, log=log, pool_job=pool_job, configs=configs, words=words,
                table_captions=table_captions, tables=tables, unet=unet, text=text, tx=make_optimizer(cfg),
                ckpt=_open_checkpointer(opts.out))


def _open_checkpointer(out: str) -> Optional[Checkpointer]:
    """The Checkpointer of ``<out>/checkpoints``; None (with a warning) if Orbax is unavailable."""
    try:
        return Checkpointer(os.path.join(out, "checkpoints"))
    except Exception as e:
        print(f"[ckpt] WARNING: Orbax unavailable, no checkpoints: {type(e).__name__}: {e}", flush=True)
        return None


def _fresh_state(run: _Run) -> tuple[Any, Optional[int]]:
    """2. ``(state, resumed_from)``: the latest checkpoint's state and step, else the initial
    state (with the ``--init-from`` weights, if any) and None. Sets ``run.lineage``."""
    import jax
    import jax.numpy as jnp

    cfg, opts, ckpt = run.cfg, run.opts, run.ckpt
    state = init_state(cfg, run.unet, run.text, run.tx)
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:
        state, meta = ckpt.restore(latest, state)
        check_recipe(meta.get("config", {}), cfg)
        run.lineage["base_steps"] = int(meta.get("base_steps", 0))
        print(f"[ckpt] resumed from step {latest} ({ckpt.directory})", flush=True)
        if meta.get("config", {}).get("steps") != cfg.steps:  # a new plan: its horizon
            state = state.replace(horizon=jnp.asarray(cfg.steps, jnp.int32))
    elif opts.init_from:
        params = load_params_from_folder(opts.init_from, run.unet, run.text)
        state = state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
        run.lineage["base_steps"] = trained_steps_of(opts.init_from)
        print(f"[init] weights from {opts.init_from} (fresh optimizer, step 0)", flush=True)
    return state, latest


def _compile_step(run: _Run, state, batch_size: int, remat: str) -> _Compiled:
    """The train step compiled ahead of time against the pool's shapes (N = ``pool_size``)."""
    import jax
    import jax.numpy as jnp

    cfg = run.cfg
    pixels = (cfg.pool_size, IMAGE_SIZE, IMAGE_SIZE)
    pool_abstract = {"images": jax.ShapeDtypeStruct(pixels + (3,), jnp.uint8),
                     "rows": jax.ShapeDtypeStruct((cfg.pool_size,), jnp.int32),
                     "bands": jax.ShapeDtypeStruct(pixels, jnp.uint8), "masks": jax.ShapeDtypeStruct(pixels, jnp.uint8)}
    run_cfg = dataclasses.replace(cfg, batch_size=batch_size, remat=remat)
    t_c = time.perf_counter()
    fn = make_train_step(run_cfg, run.configs, run.unet, run.text, run.tx, remat).lower(
        state, pool_abstract, run.tables).compile()
    return _Compiled(cfg=run_cfg, fn=fn, seconds=time.perf_counter() - t_c)


def _compile_fitting(run: _Run, state) -> _Compiled:
    """3. The step compiled with the least remat that fits (``cfg.remat`` "auto") or the asked
    one; if it does not fit the device, at half the batch (XLA's estimate, or a failed compile)."""
    limit = memory_limit()
    remat = run.cfg.remat
    if remat == "auto":
        remat = choose_remat(run.cfg, run.unet, run.text, state.params, limit)
    batch_size = run.cfg.batch_size
    while True:
        try:
            compiled = _compile_step(run, state, batch_size, remat)
        except Exception as e:
            if not (_is_oom(e) and batch_size // 2 >= MIN_BATCH):
                raise
            batch_size //= 2
            print(f"[compile] out of memory ({str(e)[:200]}); batch -> {batch_size}", flush=True)
            continue
        need = _memory_estimate(compiled.fn, limit)
        print(f"[compile] train step compiled in {compiled.seconds:.1f}s (batch {batch_size}, remat {remat})",
              flush=True)
        smaller = _fitting_batch(batch_size, need, limit)
        if smaller < batch_size:
            print(f"[compile] needs {need / 2**30:.1f} of {limit / 2**30:.1f} GiB; batch -> {smaller}", flush=True)
            batch_size = smaller
            continue
        return compiled


def _pool_to_device(run: _Run) -> tuple[dict, float]:
    """4. ``(pool, scenes rendered per second)``; pool on the device: {"images": (N, 32, 32, 3)
    uint8, "rows": (N,) int32 caption-table rows, "bands", "masks": (N, 32, 32) uint8}."""
    import jax

    cfg, opts, job = run.cfg, run.opts, run.pool_job
    # Wait at most half of what is left of the budget (a lost worker task would block forever).
    wait = max(60.0, 0.5 * (opts.time_budget_s - run.elapsed())) if opts.time_budget_s else None
    images, captions, masks = job.result(timeout=wait)
    rate = len(images) / job.seconds
    print(f"[pool] {len(images)} scenes in {job.seconds:.1f}s ({rate:.0f} scenes/s, "
          f"{job.workers} workers; ready {run.elapsed():.1f}s after start)", flush=True)
    pool = jax.device_put({"images": images, "rows": caption_rows(captions, run.table_captions),
                           "bands": edge_bands(masks, cfg.edge_width), "masks": masks.astype(np.uint8)})
    return pool, rate


def _run_steps(run: _Run, loop: _Loop, pool: dict) -> float:
    """5. Steps until ``loop.target``, the time budget, a stop signal or a non-finite loss (sets
    ``loop.stop_reason``); returns perf_counter() once the device has finished them."""
    import jax

    with _StopRequest() as stop_request:  # handlers restored however the loop ends
        while loop.step < loop.target:
            reason = _stop_reason(run, loop, stop_request)
            if reason:
                loop.stop_reason = reason
                break
            metrics = _step_once(run, loop, pool)
            if metrics is None:  # the first step ran out of memory; recompiled at half the batch
                continue
            _fit_horizon(run, loop, metrics)
            if not _log_metrics(run, loop):
                break
            _save_periodically(run, loop)
    jax.block_until_ready(loop.state.step)
    t_end = time.perf_counter()
    if loop.bar is not None:
        loop.bar.close()
    return t_end


def _stop_reason(run: _Run, loop: _Loop, stop_request: _StopRequest) -> Optional[str]:
    """"time budget" (with ``reserve_s`` left for the final checkpoint + export), "signal
    SIG..." or None."""
    opts = run.opts
    if opts.time_budget_s and run.elapsed() > opts.time_budget_s - opts.reserve_s:
        return "time budget"
    if stop_request.signal:
        reason = f"signal {stop_request.signal}"
        print(f"\n[train] {reason}: checkpoint and export at step {loop.step}, then exit", flush=True)
        return reason
    return None


def _step_once(run: _Run, loop: _Loop, pool: dict) -> Optional[dict]:
    """One step: advances ``loop`` and returns the step's metrics (device scalars). If the first
    step runs out of memory: None, with the state rebuilt and the step recompiled at half the batch."""
    import jax

    first_call = loop.t_first is None
    try:
        loop.state, metrics = loop.compiled.fn(loop.state, pool, run.tables)
        if first_call:
            jax.block_until_ready(metrics["loss"])
    except Exception as e:
        batch_size = loop.compiled.cfg.batch_size
        if not (first_call and _is_oom(e) and batch_size // 2 >= MIN_BATCH):
            raise
        batch_size //= 2  # the donated state may be gone: rebuild it
        print(f"[train] out of memory on the first step; batch -> {batch_size}", flush=True)
        loop.state, _ = _fresh_state(run)
        loop.compiled = _compile_step(run, loop.state, batch_size, loop.compiled.cfg.remat)
        return None
    loop.step += 1
    loop.pending.append(metrics)
    _wait_for_older_steps(loop.pending)  # ... but the stop checks must see the device's progress
    if first_call:
        loop.t_first = time.perf_counter()
    if loop.bar is not None:
        loop.bar.update(1)
    return metrics


def _fit_horizon(run: _Run, loop: _Loop, metrics: dict) -> None:
    """With a time budget, once the speed is known (``calibrate_steps`` after the first step;
    during warmup: no LR jump): the LR horizon and ``loop.target`` become the steps that fit."""
    opts = run.opts
    if not (opts.time_budget_s and opts.fit_schedule and not loop.fitted
            and loop.step - loop.start_step == opts.calibrate_steps + 1):
        return
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(metrics["loss"])
    per_step = (time.perf_counter() - loop.t_first) / opts.calibrate_steps
    left = opts.time_budget_s - opts.reserve_s - run.elapsed()
    fit = int(loop.step + 0.95 * left / per_step)  # 5%: periodic exports / checkpoints / logging
    horizon = max(loop.step + 1, min(run.cfg.steps, fit))
    loop.state = loop.state.replace(horizon=jnp.asarray(horizon, jnp.int32))
    loop.target = horizon
    loop.fitted = True
    if loop.bar is not None:
        loop.bar.total = loop.target
        loop.bar.refresh()
    print(f"\n[schedule] {1 / per_step:.1f} steps/s -> LR horizon {horizon} steps "
          f"(asked {run.cfg.steps})", flush=True)
    run.log.write(event="fit_schedule", step=loop.step, steps_per_s=round(1 / per_step, 3), horizon=horizon)


def _log_metrics(run: _Run, loop: _Loop) -> bool:
    """Every ``log_every`` steps and at the target: the pending metrics' means to the log and the
    bar. False (``loop.stop_reason`` "non-finite loss") if the loss is not finite."""
    import jax

    step, opts = loop.step, run.opts
    if not (step % opts.log_every == 0 or step == loop.target):
        return True
    fetched = jax.device_get(loop.pending)
    loop.pending = []
    loss = float(np.mean([m["loss"] for m in fetched]))
    record = dict(step=step, loss=round(loss, 6), elapsed=round(run.elapsed(), 2),
                  mse=round(float(np.mean([m["mse"] for m in fetched])), 6),
                  lr=float(fetched[-1]["lr"]), grad_norm=round(float(fetched[-1]["grad_norm"]), 4))
    if run.cfg.loc_weight > 0:
        record["loc"] = round(float(np.mean([m["loc"] for m in fetched])), 5)
    run.log.write(**record)
    if loop.bar is not None:
        sps = _samples_per_s(step, loop.start_step, loop.t_first, loop.compiled.cfg.batch_size)
        loop.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{sps:.0f}")
    elif step % (opts.log_every * 10) == 0:
        print(json.dumps(record), flush=True)
    if not np.isfinite(loss):
        loop.stop_reason = "non-finite loss"
        print(f"\n[train] non-finite loss at step {step}; stopping", flush=True)
        return False
    return True


def _save_periodically(run: _Run, loop: _Loop) -> None:
    """A checkpoint every ``ckpt_every`` steps, an export every ``export_every_s`` seconds."""
    opts = run.opts
    if run.ckpt is not None and opts.ckpt_every and loop.step % opts.ckpt_every == 0:
        _save_checkpoint(run, loop)
    if opts.export and opts.export_every_s and time.perf_counter() - loop.last_export > opts.export_every_s:
        _export(run, loop)


def _save_checkpoint(run: _Run, loop: _Loop) -> None:
    meta = {"config": dataclasses.asdict(loop.compiled.cfg), "model": run.configs, **run.lineage}
    run.ckpt.save(loop.step, loop.state, meta)


def _export(run: _Run, loop: _Loop) -> None:
    """The EMA weights to ``opts.export`` (and ``export_tar``), logged."""
    opts = run.opts
    export_model(opts.export, run.configs, loop.state.ema, loop.step, run.words, opts.export_tar,
                 run.cfg.scaling_factor, run.lineage["base_steps"])
    loop.last_export, loop.exported_step = time.perf_counter(), loop.step
    run.log.write(event="export", step=loop.step, elapsed=round(run.elapsed(), 2))


def _finish(run: _Run, loop: _Loop) -> None:
    """6. The final checkpoint (unless no step ran or it is saved) and export (unless the loss
    went non-finite or this step is exported)."""
    if run.ckpt is not None:
        if loop.step != loop.start_step and run.ckpt.latest_step() != loop.step:
            _save_checkpoint(run, loop)
        run.ckpt.close()
    if run.opts.export and loop.stop_reason != "non-finite loss" and loop.exported_step != loop.step:
        _export(run, loop)


def _summary(run: _Run, loop: _Loop, resumed_from: Optional[int], pool_rate: float, t_end_train: float) -> dict:
    """The run's summary (also the log's "end" event)."""
    steps_run = loop.step - loop.start_step
    timed = steps_run - 1  # the first step's time includes its wait for the device
    train_s = (t_end_train - loop.t_first) if loop.t_first else 0.0
    batch_size = loop.compiled.cfg.batch_size
    return {
        "steps": loop.step, "steps_this_run": steps_run, "resumed_from": resumed_from, "stop": loop.stop_reason,
        "batch_size": batch_size, "remat": loop.compiled.cfg.remat, "compile_s": round(loop.compiled.seconds, 2),
        "pool_s": round(run.pool_job.seconds, 2), "pool_scenes_per_s": round(pool_rate, 1),
        "steps_per_s": round(timed / train_s, 3) if timed > 0 and train_s > 0 else None,
        "samples_per_s": round(timed * batch_size / train_s, 1) if timed > 0 and train_s > 0 else None,
        "wall_s": round(run.elapsed(), 2), "horizon": int(loop.state.horizon), "export": run.opts.export,
    }
