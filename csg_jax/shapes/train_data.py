"""Training data of the shapes model: the scene pool and the caption table.

A pool of ``pool_size`` scenes is rendered once (numpy, in worker processes, overlapped with
compilation) and kept on the device as uint8; each step draws a batch from it on device.
Captions come from a fixed set of 280, tokenized once into a table; each pool image stores its
row. Nothing crosses the host-device boundary per step. Numpy only at import (the spawned pool
workers import this module).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from typing import Optional

import numpy as np

from csg_jax.shapes import world
from csg_jax.shapes.train_config import IMAGE_SIZE, LOC_WORDS
from csg_jax.tokenizer_files import DEFAULT_WORDS, write_clip_tokenizer

CHUNK = 256  # scenes rendered per worker task


def shapes_words() -> list[str]:
    """Tokenizer words: every shapes-world word (one token each) plus the default demo words."""
    return sorted(set(world.VOCABULARY) | set(DEFAULT_WORDS))


# --------------------------------------------------------------------------------------
# Scene pool (worker processes)
# --------------------------------------------------------------------------------------


def chunk_seed(seed: int, index: int) -> int:
    """Seed of pool chunk ``index``: distinct per (seed, index), independent of the worker count."""
    return seed * 1_000_003 + index


def render_chunk(task: tuple[int, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Worker: (seed, n) -> (images uint8 (n, 32, 32, 3), captions, masks bool (n, 32, 32)).
    Numpy only (runs in a spawned process, which must not need JAX)."""
    seed, n = task
    batch = world.make_batch(seed, n, size=IMAGE_SIZE, split="train")
    return batch["images"], batch["captions"], batch["masks"]


class PoolJob:
    """Renders the scene pool in the background (spawned worker processes) while the caller
    compiles; :meth:`result` waits and returns ``(images (N, 32, 32, 3) uint8, captions,
    masks (N, 32, 32) bool)``.

    Spawn, not fork: the parent has JAX's threads running and a forked child could deadlock.
    """

    def __init__(self, size: int, seed: int, workers: Optional[int] = None, chunk: int = CHUNK):
        self.size = int(size)
        self.tasks = _chunk_tasks(self.size, chunk_seed(seed, 0), chunk)
        if workers is None:  # one core is left to the compiler; containers may show the host's count
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
            workers = min(cores, 32) - 1
        self.workers = max(1, min(int(workers), len(self.tasks)))
        self.start = time.perf_counter()
        self._pool = None
        self._async = None
        try:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers)
            self._async = self._pool.map_async(render_chunk, self.tasks, chunksize=1,
                                               callback=self._finished)
        except Exception as e:  # no processes (sandbox): render in this process in result()
            print(f"[pool] worker processes unavailable ({e}); rendering in-process", flush=True)
            self._pool = None
        self.seconds: Optional[float] = None  # start to last scene rendered (not to result())

    def _finished(self, _):
        self.seconds = time.perf_counter() - self.start

    def result(self, timeout: Optional[float] = None, fallback: int = 8192) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The pool. If the workers failed, could not start or are not done within ``timeout``
        seconds (a worker killed by the OS leaves its task undone forever), ``fallback`` scenes are
        rendered here and repeated to the full size: the shape the step was compiled for."""
        parts = None
        if self._pool is not None:
            try:
                parts = self._async.get(timeout)
            except Exception as e:
                print(f"[pool] WARNING: worker processes failed ({type(e).__name__}: {e}); rendering "
                      f"{min(fallback, self.size)} scenes in-process and repeating them", flush=True)
            finally:
                self._pool.terminate()  # done or given up: no stragglers
                self._pool.join()
        if parts is None:
            n = min(fallback, self.size)
            parts = [render_chunk(t) for t in _chunk_tasks(n, self.tasks[0][0], CHUNK)]
        images = np.concatenate([p[0] for p in parts])
        captions = [c for p in parts for c in p[1]]
        masks = np.concatenate([p[2] for p in parts])
        if len(images) < self.size:
            reps = np.arange(self.size) % len(images)
            images, captions, masks = images[reps], [captions[i] for i in reps], masks[reps]
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        return images, captions, masks


def _chunk_tasks(size: int, first_seed: int, chunk: int) -> list[tuple[int, int]]:
    """(seed, n) worker tasks covering ``size`` scenes; seeds count up from ``first_seed``."""
    return [(first_seed + i, min(chunk, size - i * chunk)) for i in range(math.ceil(size / chunk))]


def edge_bands(masks: np.ndarray, width: int) -> np.ndarray:
    """(N, 32, 32) uint8: 1 within ``width`` pixels of each object's outline (see
    :func:`csg_jax.shapes.world.boundary_band`), else 0. Stored with the pool, weighted by the step.

    Why weight them: a model that ignores the shape word and paints a blob of the right colour
    only errs near the outline (at width 2 about a quarter of a world image's pixels), and most
    of the MSE is the texture and noise nobody can predict. After 5,325 uniform steps the samples
    were blobs of the right colour (shape accuracy 0.315) and 1,100 of those steps had not moved
    it; 1,081 steps continued with ``edge_weight`` 4 moved it to 0.405 (same 200 held-out
    captions, 29 gained and 11 lost).
    """
    return world.boundary_band(masks, width).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Caption table
# --------------------------------------------------------------------------------------


def all_captions() -> list[str]:
    """"" (row 0) then every caption the world can produce (5 shapes x 8 colours x 7 backgrounds)."""
    out = [""]
    for shape in world.SHAPES:
        for color in world.COLOR_NAMES:
            for bg in world.COLOR_NAMES:
                if bg != color:
                    out.append(world.caption(world.Scene(shape, color, bg, 0.5, 0.5, 0.3, 0.0, (0.0, 0.0), 0)))
    return out


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, captions: list[str], max_length: int = 77) -> np.ndarray:
    """(K, 77) int32 ids, padded / truncated exactly like :meth:`csg_jax.pipeline.Pipeline.tokenize`."""
    ids = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def word_columns(tokenizer, table_captions: list[str], attributes: tuple = LOC_WORDS) -> np.ndarray:
    """(K, len(attributes)) int32: token column (BOS = 0) of each attribute's word ("red",
    "circle" ...) in each caption-table row; 0 for the empty row."""
    from csg_jax.editing.plans import word_spans

    out = np.zeros((len(table_captions), len(attributes)), np.int32)
    for row, text in enumerate(table_captions):
        if not text:
            continue
        parsed = world.parse_caption(text)
        for j, attribute in enumerate(attributes):
            (start, end), *_ = word_spans(tokenizer, text, parsed[attribute])
            if end - start != 1:
                raise ValueError(f"{parsed[attribute]!r} is not one token in {text!r}")
            out[row, j] = start
    return out


def caption_rows(captions: list[str], table_captions: list[str]) -> np.ndarray:
    """Row of each caption in the caption table, (N,) int32."""
    index = {c: i for i, c in enumerate(table_captions)}
    try:
        return np.array([index[c] for c in captions], np.int32)
    except KeyError as e:
        raise ValueError(f"caption {e} is not in the caption table") from None


def caption_table(words: list[str], vocab_size: int) -> tuple[list[str], dict]:
    """``(captions, {"tokens": (K, 77) int32, "words": (K, len(LOC_WORDS)) int32})``: the K
    captions of :func:`all_captions` tokenized by the CLIP tokenizer of ``words`` (which must have
    ``vocab_size`` entries, the text encoder's) and their :func:`word_columns`, as numpy."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_clip_tokenizer(tmp, words)
        tokenizer = load_tokenizer(tmp)
    assert vocab == vocab_size, (vocab, vocab_size)
    table_captions = all_captions()
    return table_captions, {"tokens": tokenize(tokenizer, table_captions),
                            "words": word_columns(tokenizer, table_captions)}
