"""One evaluation end to end: discover and load every method's items, score them, write the outputs."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Callable, Optional

from csg_jax.errors import CSGError
from csg_jax.evaluation.compute import compute, load_scorers
from csg_jax.evaluation.pie import attach, compute_pie, load_pie_scorers, summarize_pie
from csg_jax.evaluation.report import write_outputs, write_pie_outputs
from csg_jax.evaluation.results import Item, discover, load_item
from csg_jax.evaluation.settings import EvalSettings


def load_results(settings: EvalSettings, log: Callable[[str], None]) -> tuple[list[Item], list[str]]:
    """(every method's items, read or marked failed/corrupt; problems with the folders), both logged."""
    problems: list[str] = []
    items: list[Item] = []
    for m, d in settings.results:
        found = discover(m, d, problems)
        for it in found:
            load_item(it, d)
        items += found
    for p in problems:
        log(f"problem: {p}")
    for it in items:
        if not it.ok:
            log(f"{it.status}: {it.method}/{it.id}: {it.error}")
    return items, problems


def run_evaluation(settings: EvalSettings, log: Optional[Callable[[str], None]] = None) -> dict:
    """Evaluate ``settings.results`` into ``settings.out``. Returns :func:`write_outputs`' dict plus
    ``items``, ``skipped``, ``problems``, ``rd`` and ``pie``: None, or with ``settings.pie_bench``
    :func:`csg_jax.evaluation.pie.summarize_pie`'s dict -- ``result["pie"]["mean"][method]`` is
    {column: value in PIE-Bench's units, "n": items} for the columns ``result["pie"]["columns"]``
    (structure, psnr, lpips, mse, ssim, clip_whole, clip_edited; those without weights left out),
    ``result["pie"]["items"]`` the per-item raw values. Raises CSGError when there is nothing to
    evaluate."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    methods = settings.methods
    if len(set(methods)) != len(methods):
        raise CSGError(f"method names must be unique, got {methods}")
    items, problems = load_results(settings, log)
    if not any(it.ok for it in items):
        raise CSGError("nothing to evaluate: no readable results in " + ", ".join(d for _, d in settings.results))
    by_method = defaultdict(dict)
    for it in items:
        if it.ok:
            by_method[it.method][it.id] = it
    mode = settings.bg_mask
    if mode != "own" and mode not in by_method and not os.path.isdir(mode):
        raise CSGError(f"--bg-mask {mode!r} is neither 'own', a method name ({', '.join(methods)}) nor a folder")
    pie_state = attach(items, settings, problems, log) if settings.pie_bench else None  # before compute: its sources
    scorers, skipped = load_scorers(settings, log)
    rd = compute(items, scorers, settings, by_method)
    pie, extra = None, {}
    if pie_state is not None:
        pie_scorers, pie_skipped = load_pie_scorers(scorers, settings, log)
        compute_pie(items, pie_scorers, settings)
        pie = summarize_pie(items, settings, pie_state, pie_skipped)
        md = write_pie_outputs(settings.out, pie, settings, problems)
        extra["pie"] = {k: pie[k] for k in ("columns", "mean", "by_edit_type", "skipped", "missing")}
        log(md)
    result = write_outputs(settings.out, items, rd, methods, scorers, skipped, problems, settings, extra)
    log(f"wrote {settings.out}: metrics.csv, summary.csv, table.md, report.json"
        + "".join(f", {m}.png" for m in result["charts"])
        + (", pie_metrics.csv, pie_summary.csv, pie_table.md" if pie else "") + f" ({time.perf_counter() - t0:.1f} s)")
    result.update(items=items, skipped=skipped, problems=problems, rd=rd, pie=pie)
    return result
