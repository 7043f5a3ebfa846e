"""Results folders of ``python -m csg_jax.translate``: finding their items, reading them, background masks."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from csg_jax import io
from csg_jax.errors import CSGError


@dataclasses.dataclass
class Item:
    """One edited image of one method."""

    method: str
    id: str
    folder: str
    status: str = "ok"  # ok | failed (translate recorded an error) | corrupt (unreadable outputs)
    error: str = ""
    task: str = "?"
    source_prompt: str = ""
    target_prompt: str = ""
    edit: Optional[np.ndarray] = None  # (H, W, 3) uint8
    source: Optional[np.ndarray] = None
    source_desc: str = ""
    own_mask: Optional[np.ndarray] = None  # (H, W) uint8 from mask.png
    notes: list = dataclasses.field(default_factory=list)
    values: dict = dataclasses.field(default_factory=dict)
    mask_desc: str = ""
    pie: Optional[object] = None  # its csg_jax.pie_bench.PieItem in --pie-bench mode
    edit_mask: Optional[np.ndarray] = None  # (H, W) bool PIE-Bench mask on the edit's grid, True = edit region
    pie_values: dict = dataclasses.field(default_factory=dict)  # PIE-Bench metrics, raw units

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, message: str, status: str = "corrupt") -> "Item":
        self.status, self.error = status, message
        return self

    def note(self, message: str) -> None:
        self.notes.append(message)


def _read_records(folder: str, problems: list) -> Optional[list[dict]]:
    """The records of ``results.jsonl`` / ``results.p*.jsonl`` (None: no such file), each torn
    line, record without an id and unreadable file reported in ``problems``."""
    from csg_jax.dataset.results import read_results, result_files

    return read_results(folder, problems) if result_files(folder) else None


def _resolve(path: Optional[str], *bases: str) -> Optional[str]:
    if not path:
        return None
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for cand in [path] + [os.path.join(b, path) for b in bases if b]:
        if os.path.exists(cand):
            return cand
    return None


def discover(method: str, folder: str, problems: list) -> list[Item]:
    """Items of one method's result folder (see :mod:`csg_jax.evaluate`); problems are appended to ``problems``."""
    if not os.path.isdir(folder):
        problems.append(f"{method}: result folder not found: {folder}")
        return []
    records = _read_records(folder, problems)
    if records is not None:
        latest: "OrderedDict[str, dict]" = OrderedDict()
        for r in records:  # a resumed run appends: the last ok record of an id wins
            rid = str(r["id"])
            if rid not in latest or r.get("status") == "ok" or latest[rid].get("status") != "ok":
                latest[rid] = r
        items = []
        for rid, r in latest.items():
            if r.get("status") != "ok":
                items.append(Item(method, rid, os.path.join(folder, rid)).fail(
                    f"translation failed: {r.get('error') or r.get('status')}", "failed"))
                continue
            paths = r.get("paths") or {}
            found = _resolve(paths.get("meta.json") or paths.get("edit.png"), folder)
            sub = os.path.dirname(found) if found else os.path.join(folder, rid)
            if not os.path.isdir(sub) and os.path.isdir(os.path.join(folder, rid)):
                sub = os.path.join(folder, rid)
            items.append(Item(method, rid, sub))
        return items
    if os.path.isfile(os.path.join(folder, "meta.json")) or os.path.isfile(os.path.join(folder, "edit.png")):
        return [Item(method, os.path.basename(os.path.normpath(folder)), folder)]
    items = []
    for sub in sorted(os.listdir(folder)):
        path = os.path.join(folder, sub)
        if sub.startswith(".") or not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isfile(os.path.join(path, "edit.png")):
            items.append(Item(method, sub, path))
    if not items:
        problems.append(f"{method}: no results in {folder} (no results.jsonl, no <id>/meta.json)")
    return items


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def _fit_source(path: str, hw: tuple[int, int]) -> np.ndarray:
    """Re-read a source image as translate did (short side to min(hw), centre crop to hw)."""
    img, _ = io.load_image(path, min(hw), 1)
    h, w = img.shape[:2]
    if (h, w) != tuple(hw):
        if h < hw[0] or w < hw[1]:
            raise CSGError(f"source {path} fits to {w}x{h}, smaller than the edit {hw[1]}x{hw[0]}")
        top, left = (h - hw[0]) // 2, (w - hw[1]) // 2
        img = img[top:top + hw[0], left:left + hw[1]]
    return img


def load_item(item: Item, results_dir: str) -> Item:
    """Read meta.json, edit.png, mask.png and the source image; marks the item corrupt on failure."""
    if not item.ok:
        return item
    meta_path = os.path.join(item.folder, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return item.fail(f"missing {meta_path}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return item.fail(f"unreadable meta.json: {type(e).__name__}: {e}")
    prompts = meta.get("prompts") if isinstance(meta.get("prompts"), dict) else {}
    item.source_prompt = str(prompts.get("source_prompt") or "")
    item.target_prompt = str(prompts.get("target_prompt") or "")
    if meta.get("task"):
        item.task = str(meta["task"])
    elif prompts.get("source_word") and prompts.get("target_words"):
        item.task = f"{prompts['source_word']} → {prompts['target_words']}"
    elif item.target_prompt:
        item.task = item.target_prompt
    edit_path = os.path.join(item.folder, "edit.png")
    try:
        item.edit = _read_rgb(edit_path)
    except FileNotFoundError:
        return item.fail(f"missing {edit_path}")
    except Exception as e:
        return item.fail(f"unreadable edit.png: {type(e).__name__}: {e}")
    hw = item.edit.shape[:2]
    mask_path = os.path.join(item.folder, "mask.png")
    if os.path.isfile(mask_path):
        try:
            from PIL import Image

            with Image.open(mask_path) as im:
                item.own_mask = np.asarray(im.convert("L"), np.uint8)
        except Exception as e:
            item.note(f"unreadable mask.png ({type(e).__name__})")
    # the source image
    image_info = meta.get("image") if isinstance(meta.get("image"), dict) else {}
    src_png = os.path.join(item.folder, "source.png")
    try:
        if os.path.isfile(src_png):
            item.source, item.source_desc = _read_rgb(src_png), "source.png"
        elif image_info.get("path"):
            path = _resolve(str(image_info["path"]), results_dir, os.path.dirname(os.path.abspath(results_dir)))
            if path is None:
                item.note(f"source image not found: {image_info['path']}")
            else:
                item.source, item.source_desc = _fit_source(path, hw), path
        elif image_info.get("demo"):
            from csg_jax.model_zoo import demo_image

            demo = demo_image(max(hw))
            item.source, item.source_desc = demo[: hw[0], : hw[1]], "demo image"
        else:
            item.note("no source image recorded (meta.json image.path)")
    except Exception as e:
        item.note(f"cannot read the source image: {e}")
    if item.source is not None and item.source.shape != item.edit.shape:
        item.note(f"source {item.source.shape[:2]} and edit {hw} differ in size; source-based metrics skipped")
        item.source = None
    return item


def _background(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 mask (white = edited foreground) -> (H, W) bool background (mask < 0.5), nearest-resized."""
    if mask.shape != tuple(hw):
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize((hw[1], hw[0]), Image.NEAREST))
    return mask.astype(np.float32) / 255.0 < 0.5


def background_for(item: Item, mode: str, by_method: dict) -> tuple[Optional[np.ndarray], str]:
    """(background, description) under the ``bg_mask`` ``mode``: "own", a method name, or a folder."""
    hw = item.edit.shape[:2]
    if mode == "own":
        if item.own_mask is None:
            return None, "no mask.png"
        return _background(item.own_mask, hw), "own mask.png"
    if mode in by_method:
        other = by_method[mode].get(item.id)
        if other is None or other.own_mask is None:
            return None, f"no {mode} mask for id {item.id}"
        return _background(other.own_mask, hw), f"{mode} mask.png"
    for ext in io.IMAGE_EXTENSIONS:
        path = os.path.join(mode, item.id + ext)
        if os.path.isfile(path):
            from PIL import Image

            with Image.open(path) as im:
                return _background(np.asarray(im.convert("L"), np.uint8), hw), f"user {path}"
    return None, f"no user mask {os.path.join(mode, item.id)}.png"
