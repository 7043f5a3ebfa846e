"""Writing an evaluation: metrics.csv, summary.csv, the paper-layout table.md, report.json, bar charts."""

from __future__ import annotations

import csv
import math
import os
from io import StringIO
from typing import Optional

from csg_jax import io
from csg_jax.evaluation.compute import summarize
from csg_jax.evaluation.results import Item
from csg_jax.evaluation.settings import HIGHER_IS_BETTER, LABELS, METRICS, PIE_COLUMNS, PIE_REFERENCE, EvalSettings

CSV_FIELDS = ("method", "id", "task", "status", "cs", "clipscore", "sd", "lpips", "bg_lpips", "bg_fraction",
              "mask", "source", "target_prompt", "source_prompt", "folder", "error")
SUMMARY_FIELDS = ("method", "task", "n", "failed", "cs", "clipscore", "sd", "rd", "rd_gamma", "rd_n", "lpips",
                  "bg_lpips")


def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _rank_marks(values: list[float], higher: bool) -> list[str]:
    """'best' / 'second' / '' per value (ties share a rank)."""
    finite = sorted({v for v in values if not math.isnan(v)}, reverse=higher)
    return ["best" if finite and not math.isnan(v) and v == finite[0] else
            "second" if len(finite) > 1 and not math.isnan(v) and v == finite[1] else "" for v in values]


def _cell(v, mark):
    s = _fmt(v)
    return f"**{s}**" if mark == "best" else f"*{s}*" if mark == "second" else s


def markdown_table(tasks, table, methods, metrics, title) -> str:
    """One of the paper's tables: task rows (and "mean") x (method, metric) columns, best bold, second italic."""
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
    """``rows`` as CSV (NaN and None empty, floats to 6 significant digits), written atomically."""
    def write(f):
        buf = StringIO()
        w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                            f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        f.write(buf.getvalue().encode())

    io.atomic_write(path, write)


PIE_ITEM_FIELDS = ("method", "id", "edit_type", "edit_type_name", "structure", "psnr", "lpips", "mse", "ssim",
                   "clip_whole", "clip_edited", "mask_fraction", "target_prompt", "source", "notes")
PIE_SUMMARY_FIELDS = ("method", "edit_type", "edit_type_name", "n", "structure", "psnr", "lpips", "mse", "ssim",
                      "clip_whole", "clip_edited")


def pie_markdown(pie: dict, settings: EvalSettings, problems: list[str]) -> str:
    """PIE-Bench's table (method rows x its columns, its units; per editing type with
    ``by_edit_type``), best in bold, second in italics, the paper's DDIM + P2P row for reference."""
    cols = [c for c in PIE_COLUMNS if c[0] in pie["columns"]]
    head = ["Method"] + [f"{label} {'↑' if hi else '↓'}" for _, label, _, hi in cols] + ["n"]
    lines = ["# PIE-Bench", "", f"Mapping file: `{settings.pie_bench}`; sources: `{settings.images or 'the results'}`.", ""]

    def block(title, rows):
        lines.extend([f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        marks = {k: _rank_marks([r[k] for r in rows], hi) for k, _, _, hi in cols}
        for i, r in enumerate(rows):
            cells = [_pie_cell(r[k], marks[k][i]) for k, _, _, _ in cols]
            lines.append("| " + " | ".join([r["method"]] + cells + [str(r["n"])]) + " |")
        lines.append("")

    block("All items", [r for r in pie["rows"] if r["edit_type"] == "all"])
    for tid in sorted({r["edit_type"] for r in pie["rows"]} - {"all"}):
        rows = [r for r in pie["rows"] if r["edit_type"] == tid]
        block(f"{tid}: {rows[0]['edit_type_name']}", rows)
    ref = PIE_REFERENCE
    lines += ["Reference, " + ref["method"] + ": "
              + " / ".join(f"{label} {ref[k]:.2f}" for k, label, _, _ in PIE_COLUMNS) + ".", "",
              "Units as PIE-Bench's: structure distance ×10³, LPIPS ×10³, MSE ×10⁴, SSIM ×10², CLIP = "
              "CLIPScore 100·max(cos, 0) with the target prompt (whole image; edited part = image × mask). "
              "PSNR / LPIPS / MSE / SSIM on the unedited part (both images × (1 − mask), mask border set); "
              "an identical unedited part has PSNR inf, which the mean keeps (as PIE-Bench's). "
              f"Structure input: {settings.pie_sd}; LPIPS net: {settings.lpips_net}"
              + ("" if settings.lpips_net == "squeeze" else " (PIE-Bench: squeeze)") + "; CLIP: "
              + (f"`{settings.clip}`" if settings.clip else "–") + " (PIE-Bench: ViT-L/14).", ""]
    missing = {m: n for m, n in pie["missing"].items() if n}
    if missing:
        lines.append("Annotated items without a result: " + ", ".join(f"{m} {n}" for m, n in missing.items()) + ".")
    if pie["skipped"]:
        lines += ["", "Skipped columns:"] + [f"- {k}: {r}" for k, r in pie["skipped"].items()]
    pie_problems = [p for p in problems if "PIE-Bench" in p]
    if pie_problems:
        lines += ["", "Problems:"] + [f"- {p}" for p in pie_problems]
    return "\n".join(lines) + "\n"


def _pie_cell(v, mark) -> str:
    s = "–" if v is None or math.isnan(v) else "inf" if math.isinf(v) else f"{v:.2f}"
    return f"**{s}**" if mark == "best" else f"*{s}*" if mark == "second" else s


def write_pie_outputs(out: str, pie: dict, settings: EvalSettings, problems: list[str]) -> str:
    """pie_metrics.csv (per item and method, raw units), pie_summary.csv (PIE units) and
    pie_table.md into ``out``; returns the table's markdown."""
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "pie_metrics.csv"), pie["items"], PIE_ITEM_FIELDS)
    write_csv(os.path.join(out, "pie_summary.csv"), pie["rows"], PIE_SUMMARY_FIELDS)
    md = pie_markdown(pie, settings, problems)
    io.atomic_write(os.path.join(out, "pie_table.md"), lambda f: f.write(md.encode()))
    return md


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
    io.atomic_write(path, lambda f: img.save(f, format="PNG"))
    return "PIL"


def _json_clean(obj):
    """NaN -> None (strict JSON), recursively. (:func:`csg_jax.io.json_default` is no substitute:
    json never calls it for floats, so NaN would be written as the non-standard ``NaN``.)"""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_outputs(out: str, items: list[Item], rd: dict, methods: list[str], scorers: dict, skipped: dict,
                  problems: list[str], settings: EvalSettings, extra: Optional[dict] = None) -> dict:
    """metrics.csv, summary.csv, table.md, report.json (plus ``extra``'s keys) and the bar charts
    into ``out``; returns {"tasks", "table", "charts"}."""
    s = settings
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
    write_csv(os.path.join(out, "summary.csv"), srows, SUMMARY_FIELDS)
    have = [m for m in METRICS if m in scorers]
    md = ["# Evaluation", "",
          f"Methods: {', '.join(f'{m} = `{d}`' for m, d in s.results)}.", ""]
    t1 = [m for m in ("cs", "sd", "rd") if m in have]
    if t1:
        md.append(markdown_table(tasks, table, methods, t1, "CS / SD / RD (Table 1 layout)"))
    if "bg_lpips" in have:
        md.append(markdown_table(tasks, table, methods, ["bg_lpips"], "BG-LPIPS (Table 3 layout)"))
    md += ["**bold**: best in the row, *italics*: second best. `mean`: over all images of a method "
           "(RD: mean of the per-task values).", "",
           "Conventions: CS = plain cosine between CLIP image and target-prompt embeddings "
           f"(CLIPScore 2.5·max(cos, 0) is in metrics.csv); CLIP resize: {s.clip_resample}. "
           f"SD: DINO last-block keys, short side {s.dino_size} (max {s.dino_max_size}). "
           f"RD: VGG-16 relu1_2..relu4_3 perceptual distances, {'native size' if not s.rd_size else f'{s.rd_size}px'}. "
           f"BG-LPIPS: LPIPS v0.1 ({s.lpips_net}) spatial map averaged over mask < 0.5, mask: {s.bg_mask}.", ""]
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
    report = {"methods": dict(s.results), "metrics": have, "skipped": skipped,
              "problems": problems + [f"{it.method}/{it.id}: {it.error}" for it in bad],
              "settings": s.recorded(),
              "charts": charts, "rd": {f"{m}|{t}": v for (m, t), v in rd.items()},
              "counts": {m: {"items": n_items[m], "evaluated": n_ok[m]} for m in methods}}
    report.update(extra or {})
    io.save_json(os.path.join(out, "report.json"), _json_clean(report))
    return {"tasks": tasks, "table": table, "charts": charts}
