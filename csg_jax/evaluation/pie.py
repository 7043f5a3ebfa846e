"""PIE-Bench mode (``--pie-bench mapping_file.json``): results matched to the annotations, PIE-Bench's
metrics per item, and its table's averages.

Per item (id = mapping key), as PIE-Bench's ``evaluation/evaluate.py`` computes them:

* ``structure`` -- DINO ViT-B/8 key self-similarity distance of source and edit (whole images).
  Its evaluator normalises 0..255 values with the ImageNet mean / std (no /255) after a tensor
  ``Resize(224, max_size=480)`` without antialiasing; ``pie_sd="pie"`` (default) does the same,
  ``"splice"`` uses our SD's input (/255, antialiased resize; the ``sd`` column);
* on the **unedited part** (source and edit both multiplied by 1 - mask): ``psnr``, ``lpips``,
  ``mse``, ``ssim`` (:mod:`csg_jax.metrics.pixel`; LPIPS v0.1 with inputs in [-1, 1]); NaN when
  the mask covers the whole image, as the official's "nan";
* ``clip_whole`` / ``clip_edited`` -- CLIPScore 100 max(cos, 0) of the edit (whole, and times the
  mask: the edited part on black) with the mapping's ``editing_prompt`` without brackets.

The mask is decoded on the source image's own grid with the border set (the official's guard
against annotation errors) and, when the edit's size differs, fitted with the source (short side
resize, centre crop; nearest neighbour for the mask). The source is ``--images DIR`` +
``image_path`` (PIE-Bench's ``annotation_images``), else the results' ``source.png`` / meta.json
image path.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from csg_jax import io
from csg_jax.errors import CSGError
from csg_jax.evaluation.results import Item, _fit_source
from csg_jax.evaluation.settings import PIE_COLUMNS, EvalSettings
from csg_jax.pie_bench import EDIT_TYPES, PieItem, decode_mask, read_mapping

PIE_KEYS = tuple(c[0] for c in PIE_COLUMNS)


def _fit_mask(mask: np.ndarray, path: str, hw: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask on the source's grid through :func:`_fit_source`'s geometry (nearest)."""
    from PIL import Image

    h, w = mask.shape
    (nw, nh), (cw, ch) = io._fit(path, w, h, min(hw), 1)
    m = Image.fromarray(mask.astype(np.uint8) * 255)
    if (nw, nh) != (w, h):
        m = m.resize((nw, nh), Image.NEAREST)
    m = np.asarray(m) > 127
    top, left = (nh - ch) // 2, (nw - cw) // 2
    m = m[top:top + ch, left:left + cw]
    top, left = (m.shape[0] - hw[0]) // 2, (m.shape[1] - hw[1]) // 2
    return m[top:top + hw[0], left:left + hw[1]]


def _attach(it: Item, entry: PieItem, images: Optional[str]) -> None:
    """Set ``it.pie``, ``it.edit_mask`` (edit grid, True = edit region) and the PIE source."""
    from PIL import Image

    hw = it.edit.shape[:2]
    path = None
    if images:
        cand = os.path.join(images, entry.image_path)
        if os.path.isfile(cand):
            path = cand
        else:
            it.note(f"PIE-Bench source not found: {cand}; using the results' source")
    if path is None and it.source_desc not in ("", "source.png", "demo image") and os.path.isfile(it.source_desc):
        path = it.source_desc
    if path is not None:
        with Image.open(path) as im:
            grid = im.size[::-1]
        mask = decode_mask(entry.mask, grid)
        src = _fit_source(path, hw)
        if tuple(grid) != tuple(hw):
            mask = _fit_mask(mask, path, hw)
        it.source, it.source_desc = src, path
    elif it.source is not None:
        grid = it.source.shape[:2]
        mask = decode_mask(entry.mask, grid)
    else:
        raise CSGError("no source image (pass --images DIR, PIE-Bench's annotation_images folder)")
    ends = [s + n for s, n in zip(entry.mask[0::2], entry.mask[1::2])]
    if ends and max(ends) > grid[0] * grid[1]:
        it.note(f"PIE-Bench mask runs past the {grid[1]}x{grid[0]} source grid (annotated on another size?)")
    it.pie, it.edit_mask = entry, mask


def attach(items: list[Item], settings: EvalSettings, problems: list, log) -> dict:
    """Match every readable item to its mapping entry (by id); returns {"entries", "missing":
    {method: [mapping ids without a result]}, "unmatched": {method: [result ids not in the
    mapping]}}. Malformed entries and unmatched ids go to ``problems``; CSGError if the mapping
    file itself cannot be read."""
    entries, bad = read_mapping(settings.pie_bench)
    for key, reason in bad:
        problems.append(f"PIE-Bench mapping entry {key!r} skipped: {reason}")
    by_id = {e.id: e for e in entries}
    unmatched: dict = OrderedDict((m, []) for m in settings.methods)
    for it in items:
        if not it.ok:
            continue
        entry = by_id.get(it.id)
        if entry is None:
            unmatched[it.method].append(it.id)
            it.note("id not in the PIE-Bench mapping file")
            continue
        try:
            _attach(it, entry, settings.images)
        except Exception as e:  # an unreadable source is this item's problem only
            it.note(f"PIE-Bench: {e}")
            problems.append(f"PIE-Bench: {it.method}/{it.id} not evaluated: {e}")
    for m, ids in unmatched.items():
        if ids:
            problems.append(f"{m}: {len(ids)} result id(s) not in the PIE-Bench mapping file: "
                            + ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else ""))
    have = {m: {it.id for it in items if it.method == m and it.ok and it.pie is not None} for m in settings.methods}
    missing = {m: [e.id for e in entries if e.id not in have[m]] for m in settings.methods}
    log(f"PIE-Bench: {len(entries)} annotated items ({len(bad)} malformed); matched "
        + ", ".join(f"{m} {len(have[m])}" for m in settings.methods))
    return {"entries": entries, "missing": missing, "unmatched": unmatched}


def load_pie_scorers(scorers: dict, settings: EvalSettings, log) -> tuple[dict, dict]:
    """PIE-Bench's scorers, sharing the networks already loaded in ``scorers`` (the main metrics'):
    ({"pixel", "structure", "lpips", "clip"} that can run, {name: reason} for the skipped ones)."""
    from csg_jax.metrics.pixel import PixelScorer
    from csg_jax.metrics.scores import StructureDistance

    s = settings
    pie, skipped = {"pixel": PixelScorer(s.batch_size)}, {}
    if "sd" in scorers:
        sd = scorers["sd"]
        pie["structure"] = sd if s.pie_sd == "splice" else StructureDistance.pie_bench(
            sd.dino, s.dino_size, s.dino_max_size, s.batch_size)
    else:
        skipped["structure"] = "needs --dino DIR (transformers facebook/dino-vitb8)" + (f": {s.dino}" if s.dino else "")
    if "bg_lpips" in scorers:
        pie["lpips"] = scorers["bg_lpips"]
    else:
        skipped["lpips"] = ("needs --lpips-net squeeze --squeeze FILE (torchvision squeezenet1_1-b8a52dc0.pth) "
                            "--lpips FILE (lpips v0.1 squeeze.pth)")
    if "cs" in scorers:
        pie["clip"] = scorers["cs"]
    else:
        skipped["clip"] = "needs --clip DIR (transformers CLIPModel, openai/clip-vit-large-patch14 for PIE-Bench)"
    log("PIE PSNR / MSE / SSIM: computing")
    for name, label in (("structure", "structure"), ("lpips", f"LPIPS ({s.lpips_net})"), ("clip", "CLIP")):
        log(f"PIE {label}: " + ("computing" if name in pie else f"skipped ({skipped[name]})"))
    if "lpips" in pie and s.lpips_net != "squeeze":
        log(f"note: PIE-Bench's LPIPS is SqueezeNet; this run uses {s.lpips_net} (--lpips-net squeeze for its numbers)")
    return pie, skipped


def _groups(pairs, key) -> "OrderedDict":
    g: "OrderedDict" = OrderedDict()
    for p in pairs:
        g.setdefault(key(p), []).append(p)
    return g


def compute_pie(items: list[Item], pie: dict, settings: EvalSettings) -> None:
    """Fill ``item.pie_values`` (raw units; keys :data:`PIE_KEYS`) of every matched item."""
    from csg_jax.evaluation.compute import _bar

    todo = [it for it in items if it.ok and it.pie is not None]
    for it in todo:
        it.pie_values = {k: float("nan") for k in PIE_KEYS}
    bar = _bar(len(todo), "PIE", settings.quiet)
    for _, group in _groups(todo, lambda it: it.edit.shape).items():
        edits = np.stack([it.edit for it in group])
        if "clip" in pie:
            prompts = [it.pie.target_prompt for it in group]
            whole = pie["clip"].clip_score(edits, prompts)
            masks = np.stack([it.edit_mask for it in group])
            edited = pie["clip"].clip_score(edits, prompts, masks)
            for it, w, e in zip(group, whole, edited):
                it.pie_values["clip_whole"] = float(w)
                it.pie_values["clip_edited"] = float(e) if it.edit_mask.any() else float("nan")
        with_src = [it for it in group if it.source is not None]
        if not with_src:
            bar.update(len(group))
            continue
        src = np.stack([it.source for it in with_src])
        edt = np.stack([it.edit for it in with_src])
        keep = ~np.stack([it.edit_mask for it in with_src])
        if "structure" in pie:
            for it, v in zip(with_src, pie["structure"](src, edt)):
                it.pie_values["structure"] = float(v)
        res = pie["pixel"](src, edt, keep)
        if "lpips" in pie:
            k8 = keep[..., None].astype(np.uint8)
            res["lpips"] = pie["lpips"](src * k8, edt * k8)["lpips"]
        for i, it in enumerate(with_src):
            empty = not keep[i].any()  # the official's "nan": no unedited pixels
            for k in ("psnr", "mse", "ssim", "lpips"):
                if k in res:
                    it.pie_values[k] = float("nan") if empty else float(res[k][i])
        bar.update(len(group))
    bar.close()


def _mean(values) -> float:
    """Mean over the items that have a value (NaN skipped; an inf PSNR stays inf, as averaged by PIE)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_pie(items: list[Item], settings: EvalSettings, state: dict, skipped: dict) -> dict:
    """result["pie"]: ``mean`` {method: {column: value in PIE units, "n": items}}, ``by_edit_type``
    {method: {type id: {...}}} (with ``by_edit_type``), ``rows`` (the summary table's rows),
    ``items`` (per item and method, raw units), ``columns``, ``skipped``, ``missing``."""
    cols = [c for c in PIE_COLUMNS if not _is_skipped(c[0], skipped)]
    matched = [it for it in items if it.ok and it.pie is not None]

    def row(sel):
        out = {"n": len(sel)}
        for key, _, factor, _ in cols:
            out[key] = _mean([it.pie_values[key] for it in sel]) * factor
        return out

    mean, by_type, rows = {}, {}, []
    for m in settings.methods:
        sel = [it for it in matched if it.method == m]
        mean[m] = row(sel)
        rows.append({"method": m, "edit_type": "all", "edit_type_name": "all", **mean[m]})
        if settings.by_edit_type:
            by_type[m] = {}
            for tid in EDIT_TYPES:
                ts = [it for it in sel if it.pie.editing_type_id == tid]
                if ts:
                    by_type[m][tid] = row(ts)
    if settings.by_edit_type:
        for tid, name in EDIT_TYPES.items():
            for m in settings.methods:
                if tid in by_type[m]:
                    rows.append({"method": m, "edit_type": tid, "edit_type_name": name, **by_type[m][tid]})
    per_item = [{"method": it.method, "id": it.id, "edit_type": it.pie.editing_type_id,
                 "edit_type_name": EDIT_TYPES[it.pie.editing_type_id], "target_prompt": it.pie.target_prompt,
                 "mask_fraction": float(it.edit_mask.mean()), "source": it.source_desc,
                 **{k: it.pie_values[k] for k in PIE_KEYS}, "notes": "; ".join(it.notes)} for it in matched]
    return {"columns": [c[0] for c in cols], "mean": mean, "by_edit_type": by_type, "rows": rows,
            "items": per_item, "skipped": dict(skipped),
            "missing": {m: len(v) for m, v in state["missing"].items()}}


def _is_skipped(key: str, skipped: dict) -> bool:
    """Whether column ``key`` is skipped (its scorer: structure, lpips or clip for both CLIP columns)."""
    return ("clip" if key.startswith("clip") else key) in skipped
