"""A dataset run: load and plan each host's rows, dispatch the sharded program, write each item.

:class:`DatasetRun` ties the pieces together (manifest -> buckets/batches -> sharded program ->
files and results log); see :mod:`csg_jax.dataset` for the whole picture. The next batch is
prepared on the host while the devices compute the current one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from csg_jax.dataset.batching import Batch, Bucket, plan_batches, plan_digest
from csg_jax.dataset.manifest import Item, item_config
from csg_jax.dataset.results import ResultsLog, _lock, clean_staging, done_ids, results_path
from csg_jax.dataset.sharded import _local_rows_of, _to_global, batch_fn, local_rows, make_mesh
from csg_jax.errors import ConfigError, CSGError, PromptError

SPAN_WIDTH = 8  # token columns of the source word per item (fixed so that all hosts agree on shapes)


@dataclasses.dataclass
class Prepared:
    """One item, ready for the device: image, prompt plan, config, timings."""

    item: Item
    config: Any
    image: np.ndarray  # (H, W, 3) float32 in [-1, 1]; a generated item's x_T (h, w, C)
    source_unit: Optional[np.ndarray]  # (H, W, 3) in [0, 1] (the grid's source panel); None: generated
    notices: list
    plan: Any  # PromptPlan
    prompts: Any  # csg.Prompts of this item alone, numpy, source columns padded to SPAN_WIDTH
    key: np.ndarray  # (2,) uint32 PRNG key from the item's seed
    load_s: float


def _pad_span(cols, wts, width: int, what: str):
    cols, wts = np.asarray(cols), np.asarray(wts)
    k = cols.shape[1]
    if k > width:
        raise PromptError(f"the {what} spans {k} tokens; dataset mode handles at most {width}")
    cols = np.concatenate([cols, np.repeat(cols[:, :1], width - k, axis=1)], axis=1)  # as batch_prompts pads
    wts = np.concatenate([wts, np.zeros((wts.shape[0], width - k), wts.dtype)], axis=1)
    return cols.astype(np.int32), wts.astype(np.float32)


def _pad_columns(prompts, width: int):
    """Numpy prompts with the token spans padded to ``width`` columns (equal shapes on every host)."""
    import jax

    p = jax.tree.map(np.asarray, prompts)
    cols, wts = _pad_span(p.source_columns, p.source_weights, width, "source word")
    p = p._replace(source_columns=cols, source_weights=wts)
    if getattr(p, "target_columns", None) is not None:
        cols, wts = _pad_span(p.target_columns, p.target_weights, width, "target text")
        p = p._replace(target_columns=cols, target_weights=wts)
    return p


def _dummy(pipe, bucket: Bucket, config) -> Prepared:
    """A placeholder row (zeros image, empty prompts) for slots whose host holds no valid item."""
    from csg_jax.editing.editor import PromptPlan, batch_prompts

    n = pipe.max_length
    plan = PromptPlan("", "", "", "", "", (1, 2), (1, 2), tuple(range(n)))
    h, w = bucket.hw
    shape = (h // pipe.downsample, w // pipe.downsample, pipe.unet.config.in_channels) if bucket.generate else (h, w, 3)
    return Prepared(Item(-1, 0, "<padding>"), config, np.zeros(shape, np.float32), np.zeros((h, w, 3), np.float32),
                    [], plan, _pad_columns(batch_prompts(pipe, [plan]), SPAN_WIDTH), np.zeros(2, np.uint32), 0.0)


class DatasetRun:
    """Translates a list of items into ``out``; see the module docstring. Call :meth:`run`."""

    def __init__(self, pipe, items: Sequence[Item], base_config, out: str, *, batch_size: int = 1,
                 size: Optional[int] = None, save_inversion: bool = False, save_latents: bool = False,
                 quiet: bool = False, model_info: Optional[dict] = None, load_s: float = 0.0, log=None,
                 generate_config=None):
        """``generate_config``: the base config of ``generate`` items (default
        :func:`~csg_jax.editing.generate.generation_config` of ``base_config``)."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from csg_jax.editing.editor import image_multiple

        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        self.pipe, self.items, self.base_config = pipe, list(items), base_config
        self.generate_config = generate_config
        self.out = os.path.abspath(out)
        self.batch_size, self.save_inversion, self.save_latents = batch_size, save_inversion, save_latents
        self.multiple = image_multiple(pipe)
        native = pipe.unet.config.sample_size * pipe.downsample
        self.size = size or native
        self.model_info, self.load_s = model_info or {}, load_s
        self.nproc, self.pidx = jax.process_count(), jax.process_index()
        self.quiet = quiet  # no progress bar (only process 0 has one anyway) and no per-item error lines
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.mesh = make_mesh()
        self.global_batch = batch_size * self.mesh.size
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.lo, self.hi = local_rows(self.data_sharding, self.global_batch)
        self.counts = {"ok": 0, "failed": 0}

    # -- planning -----------------------------------------------------------------------------------
    def plan(self) -> tuple[list[Batch], list[Item], int]:
        """(batches, items failing before batching, number of items skipped as done)."""
        done = done_ids(self.out) if os.path.isdir(self.out) else set()
        entries, errors, skipped = [], [], 0
        for it in self.items:
            if it.error is None and it.id in done:
                skipped += 1
                continue
            if it.error is not None:
                errors.append(it)
                continue
            try:
                if it.generate:
                    config, hw = self._generated_config(it), self._generated_hw()
                else:
                    config = item_config(self.base_config, it)
                    hw = _fitted_size_cached(it.image, self.size, self.multiple)
            except CSGError as e:
                errors.append(it.with_error(str(e)))
                continue
            entries.append((it, config, hw))
        return plan_batches(entries, self.global_batch), errors, skipped

    # -- per host --------------------------------------------------------------------------------------
    def _generated_hw(self) -> tuple[int, int]:
        """A generated item's image size: --size (square), down to the model's multiple."""
        side = self.size - self.size % self.multiple
        return side, side

    def _generated_config(self, item: Item):
        """A generated item's config: the generation defaults under the item's own settings."""
        from csg_jax.editing.generate import generation_config

        if self.generate_config is None:
            self.generate_config = generation_config(self.base_config)
        given = tuple(k for k, _ in item.overrides) + ("posterior_guidance",)  # (its default is in generate_config)
        return generation_config(item_config(self.generate_config, item), given)

    def _prepare_item(self, item: Item, config) -> Prepared:
        import jax

        from csg_jax import io
        from csg_jax.editing.editor import plan_prompts, prepare_prompts, to_model_range, to_unit_range
        from csg_jax.editing.generate import initial_noise

        t0 = time.perf_counter()
        if item.generate:  # the "image" is x_T (h, w, C); the source is the sample, known after the run
            latent_hw = tuple(s // self.pipe.downsample for s in self._generated_hw())
            x = np.asarray(initial_noise(config.seed, latent_hw, self.pipe.unet.config.in_channels)[0])
            image, notices = None, []
        else:
            image, notices = io.load_image(item.image, self.size, self.multiple)
            x = to_model_range(image)
        plan = plan_prompts(self.pipe, item.prompt, item.task, item.target_prompt, item.source_word,
                            config.negative_prompt, target_words=item.target_words, word_hints=item.word_hints)
        prompts = _pad_columns(prepare_prompts(self.pipe, [plan], config), SPAN_WIDTH)
        key = np.asarray(jax.random.PRNGKey(config.seed), np.uint32)
        unit = None if item.generate else to_unit_range(x)
        return Prepared(item, config, x, unit, notices, plan, prompts, key, time.perf_counter() - t0)

    def _prepare(self, batch: Batch):
        """Load and plan this host's rows of ``batch``; returns (device inputs, rows, errors)."""
        import jax

        from csg_jax.editing.config import Knobs
        from csg_jax.editing.editor import method_knobs as method_knobs_of

        slots = batch.slots(self.global_batch)
        n_real = len(batch.items)
        rows: list[Optional[Prepared]] = []
        errors: list[tuple[Item, str]] = []
        cache: dict[int, Any] = {}
        for r in range(self.lo, self.hi):
            item, config = slots[r]
            if item.index not in cache:
                try:
                    cache[item.index] = self._prepare_item(item, config)
                except CSGError as e:
                    cache[item.index] = str(e)
                except Exception as e:  # an odd file must not stop the run
                    cache[item.index] = f"{type(e).__name__}: {e}"
                if isinstance(cache[item.index], str) and r < n_real:
                    errors.append((item, cache[item.index]))
            p = cache[item.index]
            rows.append(p if isinstance(p, Prepared) else None)
        valid = [p for p in rows if p is not None]
        filler = valid[-1] if valid else _dummy(self.pipe, batch.bucket, slots[-1][1])
        filled = [p if p is not None else filler for p in rows]
        stack = lambda xs: np.stack(xs)
        prompts = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.prompts for p in filled])
        knobs = Knobs.stack([p.config for p in filled])
        images = stack([p.image for p in filled])
        keys = stack([p.key for p in filled]) if batch.bucket.sample else None
        g = self.global_batch
        put = lambda x: _to_global(x, self.data_sharding, (g, *x.shape[1:]))
        config = batch.items[0][1]  # (batch constants are equal across the batch)
        replicate = lambda x: _to_global(np.asarray(x), self.replicated, np.shape(x))
        method_knobs = jax.tree.map(replicate, method_knobs_of(config))
        rng = replicate(np.asarray(jax.random.PRNGKey(config.seed), np.uint32)) \
            if config.noise_regularization else None
        if batch.bucket.generate:  # (x_T, prompts, knobs, method knobs): Editor.generate_program
            inputs = (put(images), jax.tree.map(put, prompts), jax.tree.map(put, knobs), method_knobs)
        else:
            inputs = (put(images), None if keys is None else put(keys), jax.tree.map(put, prompts),
                      jax.tree.map(put, knobs), method_knobs, rng)
        owned = [(r, p) for r, p in zip(range(self.lo, self.hi), rows) if r < n_real and p is not None]
        return inputs, owned, errors

    def _finish(self, batch: Batch, outputs, owned, t_dispatch: float, results: ResultsLog):
        from csg_jax.editing.editor import EditResult, get_editor, to_unit_range
        from csg_jax.outputs import write_item_outputs

        try:
            local = {k: _local_rows_of(v) for k, v in outputs.items()}
        except Exception as e:  # the batch failed on the device: every item of ours in it failed
            for _, p in owned:
                self._record_error(results, p.item, f"batch {batch.number} failed: {type(e).__name__}: {e}")
            return
        batch_s = time.perf_counter() - t_dispatch
        per_image_s = batch_s / len(batch.items)
        batch_editor = get_editor(self.pipe, batch.items[0][1], tuple(s // self.pipe.downsample for s in batch.bucket.hw))
        for r, p in owned:
            i = r - self.lo
            t0 = time.perf_counter()
            timings = {"load_image_and_prompts": p.load_s, "batch": batch_s, "per_image": per_image_s}
            result = EditResult(
                plan=p.plan, inverted=local["inverted"][i], reconstruction_latent=local["reconstruction"][i],
                edited_latent=local["edited"][i], mask_raw=local["mask_raw"][i], mask=local["mask"][i],
                source_image=(to_unit_range(local["reconstruction_image"][i]) if p.source_unit is None
                              else p.source_unit),
                reconstruction=to_unit_range(local["reconstruction_image"][i]),
                edit=to_unit_range(local["edit_image"][i]), timings=timings,
                unet_evaluations=batch_editor.unet_evaluations(self.batch_size,
                                                               "generated" if p.item.generate else "image"),
                **{k: local[k][i] for k in ("null_embeddings", "null_text_iterations") if k in local})
            try:
                paths = write_item_outputs(
                    os.path.join(self.out, p.item.id), result, p.config, model_info=self.model_info,
                    image_info={"path": p.item.image, "demo": False, "notices": p.notices, "inversion_file": None,
                                "size": list(batch.bucket.hw),
                                **({"generated": {"prompt": p.item.prompt, "seed": p.config.seed}}
                                   if p.item.generate else {})},
                    timings={"load_model": self.load_s, **timings}, save_inversion=self.save_inversion,
                    save_latents=self.save_latents, source_png=p.item.generate,
                    extra_meta={"dataset": _with_extra({"id": p.item.id, "line": p.item.line, "index": p.item.index,
                                                        "batch": batch.number, "bucket": batch.bucket.label(),
                                                        "global_batch": self.global_batch, "devices": self.mesh.size},
                                                       p.item)})
            except Exception as e:
                self._record_error(results, p.item, f"cannot write outputs: {type(e).__name__}: {e}")
                continue
            timings["write"] = time.perf_counter() - t0
            results.append(_with_extra({"id": p.item.id, "status": "ok", "line": p.item.line, "image": p.item.image,
                                        "batch": batch.number, "bucket": batch.bucket.label(), "process": self.pidx,
                                        "timings_s": timings, "out": os.path.join(self.out, p.item.id), "paths": paths,
                                        "warnings": list(p.plan.warnings), "error": None}, p.item))
            self.counts["ok"] += 1

    def _record_error(self, results: ResultsLog, item: Item, message: str):
        results.append(_with_extra({"id": item.id, "status": "error", "line": item.line, "process": self.pidx,
                                    "image": item.image, "timings_s": {}, "paths": {}, "error": message}, item))
        self.counts["failed"] += 1
        if not self.quiet:
            self.log(f"error: item {item.id}: {message}")

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        import jax
        from jax.experimental import multihost_utils
        from tqdm import tqdm

        from csg_jax.editing.editor import get_editor

        os.makedirs(self.out, exist_ok=True)
        lock = _lock(self.out) if self.pidx == 0 else None
        if self.pidx == 0:
            clean_staging(self.out)
        if self.nproc > 1:
            multihost_utils.sync_global_devices("csg_jax.dataset: staging cleaned")
        batches, pre_errors, skipped = self.plan()
        if self.nproc > 1:
            multihost_utils.assert_equal(plan_digest(batches, pre_errors),
                                         "hosts disagree on the dataset plan: do they see the same manifest, "
                                         "images and output folder (a shared filesystem)?")
            multihost_utils.sync_global_devices("csg_jax.dataset: planned")  # nobody appends before all have read
        results = ResultsLog(results_path(self.out, self.pidx, self.nproc))
        for it in pre_errors:
            if it.index % self.nproc == self.pidx:
                self._record_error(results, it, it.error)
        params = jax.device_put(self.pipe.params, self.replicated) if self.nproc == 1 else jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.replicated, np.asarray(a)), self.pipe.params)
        total = sum(len(b.items) for b in batches)
        bar = tqdm(total=total, disable=self.quiet or self.pidx != 0, unit="img", desc=f"translate x{self.mesh.size} devices",
                   smoothing=0.1, dynamic_ncols=True)
        t_start = time.perf_counter()
        batch_times = []
        pending = None
        try:
            for batch in batches:
                try:
                    latent_hw = tuple(s // self.pipe.downsample for s in batch.bucket.hw)
                    fn = batch_fn(get_editor(self.pipe, batch.items[0][1], latent_hw), self.mesh, batch.bucket.sample,
                                  batch.bucket.generate)
                    inputs, owned, errors = self._prepare(batch)
                except Exception as e:  # the bucket's settings are unusable (e.g. mask_res), or out of host memory
                    inputs, errors = None, []
                    owned = [(r, _Stub(it)) for r, (it, _) in enumerate(batch.items) if self.lo <= r < self.hi]
                    outputs = _Failed(e)
                for item, msg in errors:
                    self._record_error(results, item, msg)
                t_dispatch = time.perf_counter()
                if inputs is not None:
                    try:
                        outputs = fn(params, *inputs)  # asynchronous: the host goes on while devices work
                    except Exception as e:
                        outputs = _Failed(e)
                if pending is not None:
                    self._complete(pending, results, bar, batch_times)
                pending = (batch, outputs, owned, t_dispatch)
            if pending is not None:
                self._complete(pending, results, bar, batch_times)
        finally:
            bar.close()
            results.close()
        wall = time.perf_counter() - t_start
        counts = np.array([self.counts["ok"], self.counts["failed"]], np.int64)
        if self.nproc > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(self.nproc, 2).sum(0)
        summary = {"ok": int(counts[0]), "failed": int(counts[1]), "skipped": skipped, "items": len(self.items),
                   "batches": len(batches), "buckets": len({b.bucket for b in batches}), "wall_s": wall,
                   "images_per_s": float(counts[0]) / wall if wall > 0 else 0.0,
                   "steady_images_per_s": _steady_rate(batch_times), "devices": self.mesh.size,
                   "processes": self.nproc, "batch_size_per_device": self.batch_size,
                   "global_batch": self.global_batch, "out": self.out}
        if self.pidx == 0:
            from csg_jax import io

            io.save_json(os.path.join(self.out, "summary.json"), summary)
        if lock is not None:
            lock.close()
        return summary

    def _complete(self, pending, results, bar, batch_times):
        batch, outputs, owned, t_dispatch = pending
        if isinstance(outputs, _Failed):
            for _, p in owned:
                self._record_error(results, p.item, f"batch {batch.number} failed: {outputs}")
        else:
            self._finish(batch, outputs, owned, t_dispatch, results)
        batch_times.append((len(batch.items), time.perf_counter()))
        bar.update(len(batch.items))
        bar.set_postfix(ok=self.counts["ok"], failed=self.counts["failed"], refresh=False)


def _with_extra(record: dict, item: Item) -> dict:
    """``record`` with the item's metadata (PIE-Bench's editing_type_id, ...) added; the run's own
    keys win, so a metadata name cannot hide a status or an error."""
    return {**{k: v for k, v in item.extra if k not in record}, **record}


class _Stub:
    def __init__(self, item: Item):
        self.item = item


class _Failed:
    def __init__(self, e: Exception):
        self.e = e

    def __str__(self):
        return f"{type(self.e).__name__}: {self.e}"


def _steady_rate(batch_times) -> Optional[float]:
    """Images/s after the first batch (which includes compilation)."""
    if len(batch_times) < 2:
        return None
    n = sum(k for k, _ in batch_times[1:])
    dt = batch_times[-1][1] - batch_times[0][1]
    return n / dt if dt > 0 else None


@functools.lru_cache(maxsize=65536)
def _fitted_size_cached(path: str, size: int, multiple: int) -> tuple[int, int]:
    from csg_jax import io

    return io.fitted_size(path, size, multiple)


def format_summary(s: dict) -> str:
    rate = f"{s['images_per_s']:.3f}"
    steady = s.get("steady_images_per_s")
    lines = [
        f"dataset run -> {s['out']}",
        f"  {'ok':<10}{s['ok']:>8}",
        f"  {'failed':<10}{s['failed']:>8}",
        f"  {'skipped':<10}{s['skipped']:>8}   (done in an earlier run)",
        f"  {'images/s':<10}{rate:>8}   ({s['ok']} in {s['wall_s']:.1f} s incl. compilation"
        + (f"; {steady:.3f} after the first batch" if steady else "") + ")",
        f"  {'devices':<10}{s['devices']:>8}   ({s['processes']} process(es), batch {s['batch_size_per_device']}/device, "
        f"{s['buckets']} bucket(s), {s['batches']} batch(es))",
    ]
    return "\n".join(lines)
