"""The shapes editing benchmark: every method edits the same inverted held-out images.

A *task* is "circle2square" (shape) or "red2blue" (object colour). Its sources are held-out
images whose caption has the source word (colour tasks also avoid a background of the target
colour, which would make the edit invisible). Each source is DDIM-inverted once; every method
edits that same x_T with the same prompts and settings. Per image (:func:`edit_metrics`):

* ``target``:   the judge says the edited attribute is now the target;
* ``bg_error``: mean |edit - source| (RGB in [0, 1]) outside the ground-truth mask dilated by
  ``dilate`` pixels (so the soft object edge does not count);
* ``iou``:      IoU of the edited object's mask (:func:`judge.object_mask` with the edit's judged
  colours) with the source's ground-truth mask;
* ``kept``:     the other attribute unchanged (object colour for shape tasks, shape for colour tasks).

``seconds`` per image: the method's edit (both passes) and decode, plus the shared inversion,
timed after one untimed warm-up call per compiled function (``warmup=False`` skips it: then
compile time is included in the first task's numbers).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from csg_jax.errors import PromptError
from csg_jax.shapes import world
from csg_jax.shapes.world import dilate
from csg_jax.shapes.judge import Judge, iou, object_mask

DEFAULT_TASKS = ("circle2square", "square2triangle", "red2blue", "yellow2purple")
DEFAULT_METHODS = ("ddim", "csg-no-mixup", "csg", "p2p", "pix2pix-zero")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # "circle2square"
    attribute: str  # "shape" | "color"
    source: str
    target: str

    @classmethod
    def parse(cls, name: str) -> "Task":
        source, sep, target = name.partition("2")
        if not sep:
            raise PromptError(f"a task looks like 'circle2square' or 'red2blue', got {name!r}")
        for attribute, words in (("shape", world.SHAPES), ("color", world.COLOR_NAMES)):
            if source in words and target in words and source != target:
                return cls(name, attribute, source, target)
        raise PromptError(f"task {name!r}: both words must be shapes {world.SHAPES} or colours {world.COLOR_NAMES}")

    @property
    def kept_attribute(self) -> str:
        return "color" if self.attribute == "shape" else "shape"


def take(batch: dict, idx) -> dict:
    """Rows ``idx`` of a :func:`world.make_batch` batch."""
    idx = np.asarray(idx)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in batch.items()}


def task_sources(task: Task, n: int, seed: int = 0) -> dict:
    """n held-out images for ``task`` (a make_batch dict), deterministic in ``seed``."""
    batch = world.make_batch(seed, 2 * n + 8, split="heldout", **{task.attribute: task.source})
    ok = [i for i, sc in enumerate(batch["scenes"]) if sc.background != task.target]
    return take(batch, ok[:n])


def edit_metrics(judge: Judge, task: Task, sources: dict, edits: np.ndarray, dilate_px: int = 2) -> dict:
    """Per-image metrics (arrays (B,)) of uint8 ``edits`` (B, H, W, 3) of ``sources``."""
    judged = judge.names(judge(edits))
    src = sources["images"].astype(np.float32) / 255.0
    out = edits.astype(np.float32) / 255.0
    outside = ~dilate(sources["masks"], dilate_px)
    err = np.abs(out - src).mean(axis=-1)
    bg_error = (err * outside).sum(axis=(1, 2)) / np.maximum(outside.sum(axis=(1, 2)), 1)
    ious = [iou(object_mask(e, j["color"], j["background"]), m) for e, j, m in zip(edits, judged, sources["masks"])]
    kept_truth = [getattr(sc, task.kept_attribute) for sc in sources["scenes"]]
    return {
        "target": np.array([j[task.attribute] == task.target for j in judged]),
        "bg_error": bg_error,
        "iou": np.array(ious),
        "kept": np.array([j[task.kept_attribute] == k for j, k in zip(judged, kept_truth)]),
    }


def _chunks(n: int, size: int) -> list[np.ndarray]:
    """Index arrays of ``size`` (the last padded by repeating its final index: one compiled shape)."""
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        out.append(np.concatenate([idx, np.full(size - len(idx), idx[-1])]))
    return out


def _to_uint8(images) -> np.ndarray:
    x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return (x * 255.0 + 0.5).astype(np.uint8)


def invert_sources(pipe, sources: dict, config, batch_size: int, plans, warmup: bool = True) -> tuple[list, float]:
    """DDIM-invert the sources in chunks; returns ([(idx, x_T)], seconds), timed after an untimed
    first chunk if ``warmup`` (compilation)."""
    from csg_jax.editing.editor import batch_prompts, get_editor, to_model_range

    n = len(sources["captions"])
    hw = sources["images"].shape[1:3]
    editor = get_editor(pipe, config, (hw[0] // pipe.downsample, hw[1] // pipe.downsample))
    chunks, seconds = [], 0.0
    invert = lambda x, prompts: jax.block_until_ready(editor.invert(editor.encode(x), prompts.source, config.seed))
    for k, idx in enumerate(_chunks(n, min(batch_size, n))):
        x = jnp.asarray(np.stack([to_model_range(im) for im in sources["images"][idx]]))
        prompts = batch_prompts(pipe, [plans[i] for i in idx])
        if warmup and k == 0:
            invert(x, prompts)
        t0 = time.perf_counter()
        x_T = invert(x, prompts)
        seconds += time.perf_counter() - t0
        chunks.append((idx, x_T))
    return chunks, seconds


def edit_with(pipe, method_config, plans, inverted: list, n: int, warmup: bool = True) -> tuple[np.ndarray, float]:
    """Edits (uint8 (n, H, W, 3)) of the inverted chunks by one method; and its seconds (all images)."""
    from csg_jax.editing.editor import get_editor, prepare_prompts

    def run(idx, x_T):
        prompts = prepare_prompts(pipe, [plans[i] for i in idx], method_config)
        editor = get_editor(pipe, method_config, x_T.shape[1:3])
        out = editor.edit(x_T, prompts, method_config)
        return jax.block_until_ready(editor.decode(out["edited"]))

    if warmup:
        run(*inverted[0])
    edits, seconds = [None] * n, 0.0
    for idx, x_T in inverted:
        t0 = time.perf_counter()
        images = _to_uint8(run(idx, x_T))
        seconds += time.perf_counter() - t0
        for row, i in enumerate(idx):
            edits[i] = images[row]
    return np.stack(edits), seconds


def run_benchmark(pipe, judge: Judge, tasks: Sequence[str] = DEFAULT_TASKS, n_per_task: int = 25,
                  methods: Sequence[str] = DEFAULT_METHODS, num_steps: int = 50, guidance_scale: float = 5.0,
                  seed: int = 0, batch_size: int = 25, dilate_px: int = 2, warmup: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Run every method on every task. Returns {"rows": [per (task, method) means], "skipped":
    {method: reason}, "examples": {task: {"sources", method: edits}}, "per_image": {...}}."""
    from csg_jax.editing.config import EditConfig
    from csg_jax.editing.editor import plan_prompts

    base = EditConfig(method="ddim", num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    rows, skipped, examples, per_image, warm = [], {}, {}, {}, set()
    for k, name in enumerate(tasks):
        task = Task.parse(name)
        sources = task_sources(task, n_per_task, seed + 1000 * k)
        n = len(sources["captions"])
        plans = [plan_prompts(pipe, c, task=task.name) for c in sources["captions"]]
        # warm up (compile) once per function and chunk size, not once per task
        chunk = min(batch_size, n)
        inverted, invert_s = invert_sources(pipe, sources, base, batch_size, plans,
                                            warmup and ("invert", chunk) not in warm)
        warm.add(("invert", chunk))
        log(f"[bench] {task.name}: {n} sources inverted in {invert_s:.1f}s")
        examples[task.name] = {"sources": sources["images"]}
        for method in methods:
            if method in skipped:
                continue
            try:
                config = base.replace(method=method)
                edits, edit_s = edit_with(pipe, config, plans, inverted, n, warmup and (method, chunk) not in warm)
                warm.add((method, chunk))
            except Exception as e:  # a method the editor does not have (yet), or one that fails
                skipped[method] = f"{type(e).__name__}: {e}"
                log(f"[bench] {method}: skipped ({skipped[method]})")
                continue
            m = edit_metrics(judge, task, sources, edits, dilate_px)
            per_image[f"{task.name}/{method}"] = {k2: v.tolist() for k2, v in m.items()}
            examples[task.name][method] = edits
            rows.append({"task": task.name, "method": method, "n": n,
                         **{k2: float(np.mean(v)) for k2, v in m.items()},
                         "seconds": (edit_s + invert_s) / n})
            log(f"[bench] {task.name} {method}: " + ", ".join(f"{k2} {rows[-1][k2]:.3f}" for k2 in m)
                + f", {rows[-1]['seconds']:.2f} s/img")
    return {"rows": rows + overall_rows(rows), "skipped": skipped, "examples": examples, "per_image": per_image}


def overall_rows(rows: list[dict]) -> list[dict]:
    """Image-weighted means over tasks, one row per method (task "all")."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        n = sum(r["n"] for r in mine)
        mean = lambda key: sum(r[key] * r["n"] for r in mine) / n
        out.append({"task": "all", "method": method, "n": n,
                    **{k: mean(k) for k in ("target", "bg_error", "iou", "kept", "seconds")}})
    return out


def markdown_table(rows: list[dict]) -> str:
    """One line per (task, method); the best value per task in bold (unless all are equal)."""
    cols = [("target", "target acc ↑", max), ("bg_error", "bg error ↓", min), ("iou", "mask IoU ↑", max),
            ("kept", "other attr kept ↑", max), ("seconds", "s / image", None)]
    lines = ["| task | method | n | " + " | ".join(c[1] for c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        same = [o for o in rows if o["task"] == r["task"]]
        cells = []
        for key, _, best in cols:
            text = f"{r[key]:.4f}" if key == "bg_error" else f"{r[key]:.2f}" if key == "seconds" else f"{r[key]:.3f}"
            values = {o[key] for o in same}
            if best is not None and len(values) > 1 and r[key] == best(values):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {r['task']} | {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def example_grid(examples: dict, methods: Sequence[str], per_task: int = 3, scale: int = 3):
    """PIL image: one row per example (source | each method's edit), a header of method names,
    task names at the left."""
    from PIL import Image, ImageDraw

    cols = ["source"] + [m for m in methods if any(m in ex for ex in examples.values())]
    size = next(iter(examples.values()))["sources"].shape[1] * scale
    label_w, head_h, pad = 110, 16, 2
    rows = [(task, i) for task, ex in examples.items() for i in range(min(per_task, len(ex["sources"])))]
    canvas = Image.new("RGB", (label_w + len(cols) * (size + pad), head_h + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        draw.text((label_w + c * (size + pad) + 2, 2), name, fill="black")
    for r, (task, i) in enumerate(rows):
        y = head_h + r * (size + pad)
        draw.text((2, y + size // 2 - 5), task, fill="black")
        for c, name in enumerate(cols):
            images = examples[task].get("sources" if name == "source" else name)
            if images is None:
                continue
            tile = Image.fromarray(images[i]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (size + pad), y))
    return canvas
