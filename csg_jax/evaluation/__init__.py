"""The evaluation library behind ``python -m csg_jax.evaluate`` (the paper's CS, SD, RD, BG-LPIPS).

* :mod:`.settings` -- :class:`EvalSettings` (what to evaluate, with which weights) and the metric names;
* :mod:`.results` -- translate output folders: :class:`Item`, :func:`discover`, :func:`load_item`,
  background masks (:func:`background_for`);
* :mod:`.compute` -- :func:`load_scorers`, :func:`compute` (per-item values and RD), :func:`summarize`;
* :mod:`.pie` -- PIE-Bench mode (``pie_bench``): items matched to its mapping file, its metrics per
  item (:func:`~.pie.compute_pie`) and averages (``run_evaluation(...)["pie"]``; docs/pie_bench.md);
* :mod:`.report` -- CSV files, the markdown tables, bar charts, :func:`write_outputs`, :func:`write_pie_outputs`;
* :mod:`.runner` -- :func:`run_evaluation`: all of it for one :class:`EvalSettings`.

The command line, its flags and the output files are described in :mod:`csg_jax.evaluate`.
"""

from csg_jax.evaluation.compute import compute, load_scorers, summarize
from csg_jax.evaluation.report import bar_chart, markdown_table, write_csv, write_outputs, write_pie_outputs
from csg_jax.evaluation.results import Item, background_for, discover, load_item
from csg_jax.evaluation.runner import load_results, run_evaluation
from csg_jax.evaluation.settings import HIGHER_IS_BETTER, LABELS, METRICS, PIE_COLUMNS, EvalSettings

__all__ = ["EvalSettings", "HIGHER_IS_BETTER", "Item", "LABELS", "METRICS", "background_for", "bar_chart",
           "compute", "discover", "load_item", "load_results", "load_scorers", "markdown_table", "run_evaluation",
           "summarize", "write_csv", "write_outputs", "write_pie_outputs", "PIE_COLUMNS"]
