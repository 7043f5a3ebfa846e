"""The shapes PIE-Bench run: every method x {DDIM, Direct} inversion through translate's dataset
mode on a PIE-Bench-format benchmark of held-out shapes scenes, scored by PIE-Bench's evaluator.

This is the end-to-end path a PIE-Bench user takes (mapping file in, ``--manifest`` runs,
``evaluate --pie-bench`` out), on data and a model that ship with the package:

1. :func:`csg_jax.shapes.pie.write_pie_bench` writes ``mapping_file.json`` + ``annotation_images/``;
2. each (method, inversion) is one :class:`csg_jax.dataset.DatasetRun` over the mapping file (one
   pipeline loaded once), into ``OUT/runs/<method>+<inversion>/``;
3. :func:`csg_jax.evaluation.run_evaluation` with ``pie_bench`` computes PIE-Bench's table (PSNR /
   MSE / SSIM always; structure, LPIPS and CLIP when their weights are given);
4. the shapes judge adds ``target`` (the edited attribute is now the target) and ``kept`` (the
   other attribute unchanged), which PIE-Bench's metrics cannot see.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

INVERSIONS = {"ddim": "standard", "direct": "direct"}  # row label -> EditConfig.inversion
LABELS = {"ddim": "DDIM", "direct": "Direct"}


def judge_scores(judge, mapping: dict, run_dir: str) -> dict:
    """{id: {"target": bool, "kept": bool}} of the run's ok edits, from the items' ``shapes`` field."""
    from csg_jax.dataset import read_results
    from PIL import Image

    out = {}
    for rec in read_results(run_dir):
        entry = mapping.get(rec.get("id"), {})
        info = entry.get("shapes")
        path = os.path.join(run_dir, str(rec.get("id")), "edit.png")
        if rec.get("status") != "ok" or not info or not os.path.isfile(path):
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        judged = judge.names(judge(image[None]))[0]
        kept = "color" if info["attribute"] == "shape" else "shape"
        out[rec["id"]] = {"target": judged[info["attribute"]] == info["target"],
                          "kept": judged[kept] == info["scene"][kept]}
    return out


def run_pie_benchmark(pipe, judge, data_dir: str, out: str, methods: Sequence[str], inversions: Sequence[str],
                      num_steps: int, batch_size: int = 8, weights: Optional[dict] = None,
                      log: Callable[[str], None] = print) -> dict:
    """Run every (method, inversion) over ``data_dir``'s mapping file and score them.

    ``inversions``: keys of :data:`INVERSIONS`; ``weights``: EvalSettings weight fields (clip, dino,
    squeeze, lpips) for the network columns. Returns {"rows": [...], "pie": result["pie"],
    "columns": [...], "seconds": {...}, "failed": {...}}; rows in table order."""
    from csg_jax.dataset import DatasetRun, read_manifest
    from csg_jax.editing.config import EditConfig
    from csg_jax.evaluation import EvalSettings, run_evaluation

    mapping_path = os.path.join(data_dir, "mapping_file.json")
    with open(mapping_path, encoding="utf-8") as f:
        mapping = json.load(f)
    items = read_manifest(mapping_path)
    runs, seconds, failed = [], {}, {}
    for method in methods:
        for inv in inversions:
            name = f"{method}+{inv}"
            config = EditConfig.for_method(method).replace(num_steps=num_steps, inversion=INVERSIONS[inv])
            run_dir = os.path.join(out, "runs", name)
            t0 = time.perf_counter()
            summary = DatasetRun(pipe, items, config, run_dir, batch_size=batch_size, quiet=True).run()
            seconds[name] = time.perf_counter() - t0
            failed[name] = summary["failed"]
            log(f"[pie-shapes] {name}: {summary['ok']} ok, {summary['failed']} failed, {seconds[name]:.1f}s "
                "(compile included)")
            runs.append((name, run_dir))
    settings = EvalSettings(results=tuple(runs), out=os.path.join(out, "eval"), pie_bench=mapping_path,
                            images=os.path.join(data_dir, "annotation_images"), quiet=True, **(weights or {}))
    result = run_evaluation(settings, log=lambda *a: None)
    pie = result["pie"]
    rows = []
    for name, run_dir in runs:
        method, inv = name.rsplit("+", 1)
        judged = judge_scores(judge, mapping, run_dir)
        frac = lambda k: float(np.mean([v[k] for v in judged.values()])) if judged else float("nan")
        rows.append({"method": method, "inversion": LABELS[inv], **pie["mean"][name],
                     "target_acc": 100 * frac("target"), "kept_acc": 100 * frac("kept"),
                     "seconds": seconds[name], "failed": failed[name]})
    return {"rows": rows, "pie": pie, "columns": pie["columns"], "seconds": seconds, "failed": failed}


def format_table(result: dict) -> str:
    """The PIE-Bench table (markdown) with the judge's columns."""
    from csg_jax.evaluation.settings import PIE_COLUMNS

    labels = {c[0]: c[1] for c in PIE_COLUMNS}
    cols = list(result["columns"])
    head = ["method", "inversion"] + [labels[c] for c in cols] + ["target acc. %", "kept %", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["method"], r["inversion"]] + [f"{r[c]:.2f}" for c in cols]
        cells += [f"{r['target_acc']:.1f}", f"{r['kept_acc']:.1f}", str(r["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [c[1] for c in PIE_COLUMNS if c[0] not in cols]
    if missing:
        lines += ["", f"Not computed (their networks' weights were not given: --dino, --squeeze + --lpips, --clip): "
                      f"{', '.join(missing)}."]
    return "\n".join(lines)
