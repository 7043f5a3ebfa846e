"""``python -m csg_jax.evaluate``: the paper's metrics (CS, SD, RD, BG-LPIPS) over translate outputs.

Example::

    python -m csg_jax.evaluate --results DDIM=out/ddim --results CSG=out/csg \\
        --clip weights/clip-vit-base-patch32 --dino weights/dino-vitb8 \\
        --vgg weights/vgg16-397923af.pth --lpips weights/lpips/vgg.pth --out out/eval

``--results METHOD=DIR`` (repeatable; the order gives the table's column order): DIR is a
``python -m csg_jax.translate`` output -- a dataset run with ``results.jsonl`` (one line per item:
id, status, paths), a folder of ``<id>/`` subfolders with ``meta.json`` + ``edit.png``, or one
single-image output folder. Per item we read ``edit.png``, ``mask.png`` and ``meta.json`` (target
prompt, source word -> task row, source image path); the source image is ``source.png`` when the
folder has one, else ``meta.json``'s ``image.path`` re-read and fitted to the edit's size exactly as
translate did (short side resize, centre crop), or the built-in demo image.

Metrics (each needs its weights; missing weights skip that metric with a message):

* CS (``--clip``, a transformers CLIPModel folder): cosine between CLIP embeddings of the edit and
  the target prompt (plain cosine; ``clipscore`` = 2.5 max(cos, 0) in metrics.csv);
* SD (``--dino``, a transformers ViTModel folder, facebook/dino-vitb8): Splice's structure distance;
* RD (``--vgg``, a torchvision vgg16 state dict): Eq. 19 over the items of each (method, task),
  perceptual distances of Johnson et al.;
* BG-LPIPS (``--vgg`` + ``--lpips``, the lpips package's v0.1 ``vgg.pth``; or ``--lpips-net alex``
  with ``--alex`` + lpips ``alex.pth``): spatial LPIPS averaged over background pixels, background =
  mask < 0.5 of the method's own ``mask.png`` (``--bg-mask own``), of another method's mask for the
  same id (``--bg-mask METHOD``, the same region for every method) or of user masks
  ``DIR/<id>.png`` (``--bg-mask DIR``; white = edited foreground). The ``mask`` column records which.

Writes into ``--out``: ``metrics.csv`` (one row per item and method), ``summary.csv`` (per task and
method), ``table.md`` (the paper's layout: task rows x method columns, best in bold, second best in
italics), ``report.json`` (settings, skipped metrics, problems) and one bar chart per metric
(``cs.png``, ``sd.png``, ``rd.png``, ``bg_lpips.png``). Corrupt or failed items are listed and
skipped. Exit status: 0 all items evaluated, 3 some items could not be, 2 nothing to evaluate.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import sys
import time
from collections import OrderedDict, defaultdict
from typing import Any, Optional

import numpy as np

from csg_jax import runtime
from csg_jax.errors import CSGError, run_guarded

METRICS = ("cs", "sd", "rd", "bg_lpips")
LABELS = {"cs": "CS", "sd": "SD", "rd": "RD", "bg_lpips": "BG-LPIPS"}
HIGHER_IS_BETTER = {"cs": True, "sd": False, "rd": False, "bg_lpips": False}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CSV_FIELDS = ("method", "id", "task", "status", "cs", "clipscore", "sd", "lpips", "bg_lpips", "bg_fraction",
              "mask", "source", "target_prompt", "source_prompt", "folder", "error")


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, message: str, status: str = "corrupt") -> "Item":
        self.status, self.error = status, message
        return self

    def note(self, message: str) -> None:
        self.notes.append(message)


# --- discovery -------------------------------------------------------------------------------------

def _read_records(folder: str, problems: list) -> Optional[list[dict]]:
    files = sorted(set(glob.glob(os.path.join(folder, "results.jsonl")) + glob.glob(os.path.join(folder, "results.p*.jsonl"))))
    if not files:
        return None
    records = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        problems.append(f"{path}:{n}: not JSON (torn line?), skipped")
                        continue
                    if isinstance(rec, dict) and "id" in rec:
                        records.append(rec)
                    else:
                        problems.append(f"{path}:{n}: no 'id', skipped")
        except OSError as e:
            problems.append(f"cannot read {path}: {e}")
    return records


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
    """Items of one method's result folder (see the module docstring)."""
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
    from csg_jax import io

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


# --- masks -----------------------------------------------------------------------------------------

def _background(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 mask (white = edited foreground) -> (H, W) bool background (mask < 0.5), nearest-resized."""
    if mask.shape != tuple(hw):
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize((hw[1], hw[0]), Image.NEAREST))
    return mask.astype(np.float32) / 255.0 < 0.5


def background_for(item: Item, mode: str, by_method: dict) -> tuple[Optional[np.ndarray], str]:
    """(background, description) under ``--bg-mask`` ``mode``: "own", a method name, or a folder."""
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
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(mode, item.id + ext)
        if os.path.isfile(path):
            from PIL import Image

            with Image.open(path) as im:
                return _background(np.asarray(im.convert("L"), np.uint8), hw), f"user {path}"
    return None, f"no user mask {os.path.join(mode, item.id)}.png"


# --- metric runs -----------------------------------------------------------------------------------

def _groups(items: list[Item], key) -> "OrderedDict[Any, list[Item]]":
    g: "OrderedDict[Any, list[Item]]" = OrderedDict()
    for it in items:
        g.setdefault(key(it), []).append(it)
    return g


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


def load_scorers(args, log) -> tuple[dict, dict]:
    """{metric: scorer} for every metric with weights; {metric: reason} for the skipped ones."""
    from csg_jax.metrics import scores as S

    scorers, skipped = {}, {}

    def attempt(metric, what, flag, fn):
        if not flag:
            skipped[metric] = f"no {what} given"
            return
        try:
            scorers[metric] = fn()
        except CSGError as e:
            skipped[metric] = str(e)
        except Exception as e:  # a file that is not what it claims: same message path
            skipped[metric] = f"cannot load {flag}: {type(e).__name__}: {e}"

    def clip():
        from csg_jax.metrics.vit import load_clip

        return S.ClipSimilarity(load_clip(args.clip), resample=args.clip_resample, batch_size=args.batch_size)

    def dino():
        from csg_jax.metrics.vit import load_dino

        return S.StructureDistance(load_dino(args.dino), size=args.dino_size, max_size=args.dino_max_size,
                                   batch_size=args.batch_size)

    def vgg():
        from csg_jax.metrics.vgg import load_trunk

        cfg, params = load_trunk(args.vgg, "vgg16")
        return S.Perceptual(cfg, params, size=args.rd_size, batch_size=args.batch_size)

    def lp():
        from csg_jax.metrics.vgg import load_heads, load_trunk

        trunk_file = args.vgg if args.lpips_net == "vgg" else args.alex
        if not trunk_file:
            raise CSGError(f"LPIPS ({args.lpips_net}) also needs the trunk weights: "
                           + ("--vgg FILE (torchvision vgg16)" if args.lpips_net == "vgg" else "--alex FILE (torchvision alexnet)"))
        cfg, trunk = load_trunk(trunk_file, "vgg16" if args.lpips_net == "vgg" else "alexnet")
        return S.LPIPSScorer(cfg, trunk, load_heads(args.lpips, cfg), batch_size=args.batch_size)

    attempt("cs", "--clip folder", args.clip, clip)
    attempt("sd", "--dino folder", args.dino, dino)
    attempt("rd", "--vgg file", args.vgg, vgg)
    attempt("bg_lpips", "--lpips file", args.lpips, lp)
    for m in METRICS:
        log(f"{LABELS[m]:>8}: " + ("computing" if m in scorers else f"skipped ({skipped[m]})"))
    return scorers, skipped


def compute(items: list[Item], scorers: dict, args, by_method: dict, quiet: bool) -> dict:
    """Fill ``item.values`` and return {(method, task): {"rd": ..., "rd_gamma": ..., "rd_n": ...}}."""
    ok = [it for it in items if it.ok]
    with_src = [it for it in ok if it.source is not None]
    if "cs" in scorers:
        bar = _bar(len(ok), "CS", quiet)
        for _, group in _groups(ok, lambda it: it.edit.shape).items():
            res = scorers["cs"](np.stack([it.edit for it in group]), [it.target_prompt for it in group], bar.update)
            for it, c, s in zip(group, res["cs"], res["clipscore"]):
                it.values["cs"], it.values["clipscore"] = float(c), float(s)
        bar.close()
    if "sd" in scorers:
        bar = _bar(len(with_src), "SD", quiet)
        for _, group in _groups(with_src, lambda it: it.edit.shape).items():
            sd = scorers["sd"](np.stack([it.source for it in group]), np.stack([it.edit for it in group]), bar.update)
            for it, v in zip(group, sd):
                it.values["sd"] = float(v)
        bar.close()
    if "bg_lpips" in scorers:
        todo = []
        for it in with_src:
            bg, desc = background_for(it, args.bg_mask, by_method)
            it.mask_desc = desc
            if bg is None:
                it.note(f"BG-LPIPS: {desc}")
                bg = np.ones(it.edit.shape[:2], bool)  # still gives full-image LPIPS
                it.values["_no_bg"] = True
            todo.append((it, bg))
        bar = _bar(len(todo), "LPIPS", quiet)
        for _, group in _groups(todo, lambda p: p[0].edit.shape).items():
            res = scorers["bg_lpips"](np.stack([p[0].source for p in group]), np.stack([p[0].edit for p in group]),
                                      np.stack([p[1] for p in group]), bar.update)
            for (it, _), lp, bl, fr in zip(group, res["lpips"], res["bg_lpips"], res["bg_fraction"]):
                it.values["lpips"] = float(lp)
                if not it.values.pop("_no_bg", False):
                    it.values["bg_lpips"], it.values["bg_fraction"] = float(bl), float(fr)
        bar.close()
    rd = {}
    if "rd" in scorers:
        groups = _groups(with_src, lambda it: (it.method, it.task))
        bar = _bar(len(groups), "RD", quiet)
        for key, group in groups.items():
            shapes = {it.edit.shape for it in group}
            scorer = scorers["rd"]
            if len(group) < 2:
                rd[key] = {"rd": float("nan"), "rd_gamma": float("nan"), "rd_n": len(group),
                           "rd_note": "needs >= 2 images"}
            elif len(shapes) > 1 and not scorer.size:
                rd[key] = {"rd": float("nan"), "rd_gamma": float("nan"), "rd_n": len(group),
                           "rd_note": "images of different sizes: pass --rd-size"}
            else:
                from csg_jax.metrics.vgg import relational_distance

                def stack(images):
                    if len({x.shape for x in images}) == 1:
                        return np.stack(images)
                    from PIL import Image  # mixed sizes: to --rd-size on the host (antialiased bilinear)

                    return np.stack([np.asarray(Image.fromarray(x).resize((scorer.size, scorer.size), Image.BILINEAR))
                                     for x in images])

                g_src = scorer.pairwise(stack([it.source for it in group]))
                g_tgt = scorer.pairwise(stack([it.edit for it in group]))
                value, gamma = relational_distance(g_src, g_tgt)
                rd[key] = {"rd": value, "rd_gamma": gamma, "rd_n": len(group)}
            bar.update()
        bar.close()
    return rd


# --- outputs ---------------------------------------------------------------------------------------

def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(items: list[Item], rd: dict, methods: list[str]) -> tuple[list[str], dict]:
    """(task order, {(method, task | "mean"): {metric: value, "n": ..., "failed": ...}})."""
    tasks = list(OrderedDict.fromkeys(it.task for it in items if it.ok))
    table = {}
    for m in methods:
        for t in tasks + ["mean"]:
            sel = [it for it in items if it.method == m and (t == "mean" or it.task == t)]
            good = [it for it in sel if it.ok]
            row = {"n": len(good), "failed": len(sel) - len(good)}
            for k in ("cs", "clipscore", "sd", "lpips", "bg_lpips"):
                row[k] = _mean([it.values.get(k) for it in good])
            if t == "mean":
                row["rd"] = _mean([rd[(m, tt)]["rd"] for tt in tasks if (m, tt) in rd])
            else:
                row.update(rd.get((m, t), {"rd": float("nan")}))
            table[(m, t)] = row
    return tasks, table


def _rank_marks(values: list[float], higher: bool) -> list[str]:
    """'best' / 'second' / '' per value (ties share a rank)."""
    finite = sorted({v for v in values if not math.isnan(v)}, reverse=higher)
    return ["best" if finite and not math.isnan(v) and v == finite[0] else
            "second" if len(finite) > 1 and not math.isnan(v) and v == finite[1] else "" for v in values]


def _cell(v, mark):
    s = _fmt(v)
    return f"**{s}**" if mark == "best" else f"*{s}*" if mark == "second" else s


def markdown_table(tasks, table, methods, metrics, title) -> str:
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    head = ["Task"] + [f"{meth} {LABELS[m]} ({arrows[m]})" for meth in methods for m in metrics]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks + ["mean"]:
        cells = {}
        for m in metrics:
            vals = [table[(meth, t)][m] for meth in methods]
            for meth, v, mark in zip(methods, vals, _rank_marks(vals, HIGHER_IS_BETTER[m])):
                cells[(meth, m)] = _cell(v, mark)
        label = f"*{t}*" if t == "mean" else t
        lines.append("| " + " | ".join([label] + [cells[(meth, m)] for meth in methods for m in metrics]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list[dict], fields) -> None:
    from csg_jax import io

    def write(f):
        import io as _io

        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                            f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        f.write(buf.getvalue().encode())

    io.atomic_write(path, write)


def _palette(i: int) -> tuple[int, int, int]:
    colors = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96),
              (218, 139, 195), (140, 140, 140)]
    return colors[i % len(colors)]


def bar_chart(path: str, title: str, tasks: list[str], methods: list[str], values: dict) -> str:
    """Grouped bars (x: tasks, one bar per method). matplotlib when installed, else drawn with PIL.
    ``values[(method, task)]`` may be NaN (no bar). Returns the backend used."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(tasks) * max(1, len(methods)) / 2), 3.2))
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            ys = [values.get((m, t), float("nan")) for t in tasks]
            ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(tasks))], ys, width, label=m,
                   color=[c / 255 for c in _palette(i)])
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=20, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    from PIL import Image, ImageDraw

    bar_w, gap, left, top, plot_h = 18, 24, 70, 40, 220
    group_w = bar_w * max(len(methods), 1)
    width = left + len(tasks) * (group_w + gap) + gap + 10
    legend_h = 16 * len(methods) + 10
    height = top + plot_h + 60 + legend_h
    img = Image.new("RGB", (max(width, 320), height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title.replace("→", "->"), fill="black")
    finite = [v for v in values.values() if not math.isnan(v)]
    vmax = max(finite) if finite else 1.0
    vmin = min(0.0, min(finite)) if finite else 0.0
    vmax = vmax if vmax > vmin else vmin + 1.0
    y_of = lambda v: top + plot_h - (v - vmin) / (vmax - vmin) * plot_h
    d.line([(left, top), (left, top + plot_h)], fill="black")
    d.line([(left, y_of(0.0)), (width - 10, y_of(0.0))], fill="black")
    for k in range(5):
        v = vmin + (vmax - vmin) * k / 4
        d.text((4, y_of(v) - 6), f"{v:.3g}", fill="black")
        d.line([(left - 4, y_of(v)), (left, y_of(v))], fill="black")
    for ti, t in enumerate(tasks):
        x0 = left + gap + ti * (group_w + gap)
        for mi, m in enumerate(methods):
            v = values.get((m, t), float("nan"))
            if not math.isnan(v):
                y0, y1 = sorted((y_of(v), y_of(0.0)))
                d.rectangle([x0 + mi * bar_w, y0, x0 + (mi + 1) * bar_w - 2, y1], fill=_palette(mi))
        label = t.replace("→", "->").encode("ascii", "replace").decode()
        d.text((x0, top + plot_h + 8), label[: max(10, (group_w + gap) // 6)], fill="black")
    for mi, m in enumerate(methods):
        y = top + plot_h + 40 + 16 * mi
        d.rectangle([left, y, left + 10, y + 10], fill=_palette(mi))
        d.text((left + 16, y - 1), m, fill="black")
    from csg_jax import io

    io.atomic_write(path, lambda f: img.save(f, format="PNG"))
    return "PIL"


def _json_clean(obj):
    """NaN -> None (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_outputs(out: str, items: list[Item], rd: dict, methods: list[str], scorers: dict, skipped: dict,
                  problems: list[str], args) -> dict:
    from csg_jax import io

    os.makedirs(out, exist_ok=True)
    tasks, table = summarize(items, rd, methods)
    rows = []
    for it in items:
        row = {"method": it.method, "id": it.id, "task": it.task, "status": it.status,
               "mask": it.mask_desc, "source": it.source_desc, "target_prompt": it.target_prompt,
               "source_prompt": it.source_prompt, "folder": it.folder,
               "error": "; ".join(([it.error] if it.error else []) + it.notes)}
        row.update({k: it.values.get(k) for k in ("cs", "clipscore", "sd", "lpips", "bg_lpips", "bg_fraction")})
        rows.append(row)
    write_csv(os.path.join(out, "metrics.csv"), rows, CSV_FIELDS)
    srows = [{"method": m, "task": t, **table[(m, t)]} for m in methods for t in tasks + ["mean"]]
    write_csv(os.path.join(out, "summary.csv"), srows,
              ("method", "task", "n", "failed", "cs", "clipscore", "sd", "rd", "rd_gamma", "rd_n", "lpips", "bg_lpips"))
    have = [m for m in METRICS if m in scorers]
    md = ["# Evaluation", "",
          f"Methods: {', '.join(f'{m} = `{d}`' for m, d in args.results)}.", ""]
    t1 = [m for m in ("cs", "sd", "rd") if m in have]
    if t1:
        md.append(markdown_table(tasks, table, methods, t1, "CS / SD / RD (Table 1 layout)"))
    if "bg_lpips" in have:
        md.append(markdown_table(tasks, table, methods, ["bg_lpips"], "BG-LPIPS (Table 3 layout)"))
    md += ["**bold**: best in the row, *italics*: second best. `mean`: over all images of a method "
           "(RD: mean of the per-task values).", "",
           "Conventions: CS = plain cosine between CLIP image and target-prompt embeddings "
           f"(CLIPScore 2.5·max(cos, 0) is in metrics.csv); CLIP resize: {args.clip_resample}. "
           f"SD: DINO last-block keys, short side {args.dino_size} (max {args.dino_max_size}). "
           f"RD: VGG-16 relu1_2..relu4_3 perceptual distances, {'native size' if not args.rd_size else f'{args.rd_size}px'}. "
           f"BG-LPIPS: LPIPS v0.1 ({args.lpips_net}) spatial map averaged over mask < 0.5, mask: {args.bg_mask}.", ""]
    n_items = {m: sum(1 for it in items if it.method == m) for m in methods}
    n_ok = {m: sum(1 for it in items if it.method == m and it.ok) for m in methods}
    md.append("Items evaluated: " + ", ".join(f"{m} {n_ok[m]}/{n_items[m]}" for m in methods) + ".")
    if skipped:
        md += ["", "Skipped metrics:"] + [f"- {LABELS[m]}: {r}" for m, r in skipped.items()]
    bad = [it for it in items if not it.ok]
    if bad or problems:
        md += ["", "Problems:"] + [f"- {p}" for p in problems] + [f"- {it.method}/{it.id}: {it.error}" for it in bad]
    io.atomic_write(os.path.join(out, "table.md"), lambda f: f.write(("\n".join(md) + "\n").encode()))
    charts = {}
    for m in have:
        vals = {(meth, t): table[(meth, t)][m] for meth in methods for t in tasks}
        charts[m] = bar_chart(os.path.join(out, f"{m}.png"), f"{LABELS[m]} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)",
                              tasks, methods, vals)
    report = {"methods": dict(args.results), "metrics": have, "skipped": skipped,
              "problems": problems + [f"{it.method}/{it.id}: {it.error}" for it in bad],
              "settings": {"clip": args.clip, "dino": args.dino, "vgg": args.vgg, "lpips": args.lpips,
                           "lpips_net": args.lpips_net, "alex": args.alex, "bg_mask": args.bg_mask,
                           "clip_resample": args.clip_resample, "dino_size": args.dino_size,
                           "dino_max_size": args.dino_max_size, "rd_size": args.rd_size, "cs": "cosine"},
              "charts": charts, "rd": {f"{m}|{t}": v for (m, t), v in rd.items()},
              "counts": {m: {"items": n_items[m], "evaluated": n_ok[m]} for m in methods}}
    io.save_json(os.path.join(out, "report.json"), _json_clean(report))
    return {"tasks": tasks, "table": table, "charts": charts}


# --- CLI -------------------------------------------------------------------------------------------

def _method_dir(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR, got {s!r}")
    m, d = s.split("=", 1)
    if not m or not d:
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR, got {s!r}")
    return m, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csg_jax.evaluate",
                                description="CS, SD, RD and BG-LPIPS of translate outputs, and the paper's tables.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", type=_method_dir, action="append", required=True, metavar="METHOD=DIR",
                   help="a method's translate output folder (repeatable; order = column order)")
    p.add_argument("--out", default="out/eval", help="output folder")
    w = p.add_argument_group("weights (a metric without its weights is skipped)")
    w.add_argument("--clip", metavar="DIR", help="transformers CLIPModel folder (openai/clip-vit-base-patch32, -large-patch14) -> CS")
    w.add_argument("--dino", metavar="DIR", help="transformers ViTModel folder (facebook/dino-vitb8) -> SD")
    w.add_argument("--vgg", metavar="FILE", help="torchvision vgg16 state dict (.pth or .safetensors) -> RD (and the LPIPS trunk)")
    w.add_argument("--lpips", metavar="FILE", help="lpips v0.1 linear heads (lpips/weights/v0.1/vgg.pth) -> BG-LPIPS")
    w.add_argument("--lpips-net", choices=["vgg", "alex"], default="vgg", help="LPIPS trunk")
    w.add_argument("--alex", metavar="FILE", help="torchvision alexnet state dict (with --lpips-net alex)")
    s = p.add_argument_group("settings")
    s.add_argument("--bg-mask", default="own",
                   help="BG-LPIPS background: 'own' (each method's mask.png), a METHOD name (its masks for every "
                        "method) or a DIR of <id>.png user masks; background = mask < 0.5")
    s.add_argument("--clip-resample", choices=["antialias", "torch", "pil"], default="antialias",
                   help="CLIP resize: antialias (JAX, PIL's float filter), torch (F.interpolate, no antialias), "
                        "pil (PIL 8-bit on the host, bit-exact CLIPImageProcessor)")
    s.add_argument("--dino-size", type=int, default=224, help="DINO input short side")
    s.add_argument("--dino-max-size", type=int, default=480, help="DINO input long side cap")
    s.add_argument("--rd-size", type=int, help="resize images to this square size for RD (default: native size)")
    s.add_argument("--batch-size", type=int, default=8, help="images per jitted call")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    runtime.add_cli_arguments(s)
    return p


def run(args, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    methods = [m for m, _ in args.results]
    if len(set(methods)) != len(methods):
        raise CSGError(f"method names must be unique, got {methods}")
    problems: list[str] = []
    items: list[Item] = []
    for m, d in args.results:
        found = discover(m, d, problems)
        for it in found:
            load_item(it, d)
        items += found
    for p in problems:
        log(f"problem: {p}")
    for it in items:
        if not it.ok:
            log(f"{it.status}: {it.method}/{it.id}: {it.error}")
    if not any(it.ok for it in items):
        raise CSGError("nothing to evaluate: no readable results in " + ", ".join(d for _, d in args.results))
    by_method = defaultdict(dict)
    for it in items:
        if it.ok:
            by_method[it.method][it.id] = it
    if args.bg_mask != "own" and args.bg_mask not in by_method and not os.path.isdir(args.bg_mask):
        raise CSGError(f"--bg-mask {args.bg_mask!r} is neither 'own', a method name ({', '.join(methods)}) nor a folder")
    scorers, skipped = load_scorers(args, log)
    rd = compute(items, scorers, args, by_method, args.quiet)
    result = write_outputs(args.out, items, rd, methods, scorers, skipped, problems, args)
    log(f"wrote {args.out}: metrics.csv, summary.csv, table.md, report.json"
        + "".join(f", {m}.png" for m in result["charts"]) + f" ({time.perf_counter() - t0:.1f} s)")
    result.update(items=items, skipped=skipped, problems=problems, rd=rd)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.configure_from_args(args)
    result = run_guarded(lambda: run(args), "no report written")
    if isinstance(result, int):
        return result
    bad = [it for it in result["items"] if not it.ok]
    return 3 if bad or result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
