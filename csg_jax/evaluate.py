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

PIE-Bench (``--pie-bench mapping_file.json``, with ``--images annotation_images``; docs/pie_bench.md)::

    python -m csg_jax.evaluate --results CSG=out/pie_csg --pie-bench PIE/mapping_file.json \\
        --images PIE/annotation_images --clip weights/clip-vit-large-patch14 --dino weights/dino-vitb8 \\
        --lpips-net squeeze --squeeze weights/squeezenet1_1-b8a52dc0.pth --lpips weights/lpips/squeeze.pth \\
        --by-edit-type --out out/eval_pie

adds PIE-Bench's per-item metrics (:mod:`csg_jax.evaluation.pie`: structure distance; PSNR, LPIPS,
MSE, SSIM of the unedited part; CLIPScore of the whole edit and of its edited part) and writes
``pie_metrics.csv``, ``pie_summary.csv`` and ``pie_table.md`` (PIE-Bench's units: structure x10^3,
LPIPS x10^3, MSE x10^4, SSIM x10^2), also under ``report.json``'s ``pie``. PSNR / MSE / SSIM need no
weights; the others are skipped, with the flag to pass, when theirs are missing. Malformed mapping
entries and result ids not in the mapping are listed as problems.

This module is the command line only; the library is :mod:`csg_jax.evaluation` (typed
:class:`~csg_jax.evaluation.EvalSettings`, :func:`~csg_jax.evaluation.run_evaluation`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

from csg_jax import runtime
from csg_jax.errors import run_guarded
from csg_jax.evaluation import EvalSettings, run_evaluation


def _method_dir(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR, got {s!r}")
    m, d = s.split("=", 1)
    if not m or not d:
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR, got {s!r}")
    return m, d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csg_jax.evaluate",
                                description="CS, SD, RD and BG-LPIPS of translate outputs, the paper's tables, and PIE-Bench's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", type=_method_dir, action="append", required=True, metavar="METHOD=DIR",
                   help="a method's translate output folder (repeatable; order = column order)")
    p.add_argument("--out", default=EvalSettings.out, help="output folder")
    w = p.add_argument_group("weights (a metric without its weights is skipped)")
    w.add_argument("--clip", metavar="DIR", help="transformers CLIPModel folder (openai/clip-vit-base-patch32, -large-patch14) -> CS")
    w.add_argument("--dino", metavar="DIR", help="transformers ViTModel folder (facebook/dino-vitb8) -> SD")
    w.add_argument("--vgg", metavar="FILE", help="torchvision vgg16 state dict (.pth or .safetensors) -> RD (and the LPIPS trunk)")
    w.add_argument("--lpips", metavar="FILE", help="lpips v0.1 linear heads (lpips/weights/v0.1/vgg.pth) -> BG-LPIPS")
    w.add_argument("--lpips-net", choices=["vgg", "alex", "squeeze"], default=EvalSettings.lpips_net,
                   help="LPIPS trunk (PIE-Bench: squeeze)")
    w.add_argument("--alex", metavar="FILE", help="torchvision alexnet state dict (with --lpips-net alex)")
    w.add_argument("--squeeze", metavar="FILE",
                   help="torchvision squeezenet1_1 state dict (squeezenet1_1-b8a52dc0.pth, with --lpips-net squeeze)")
    pb = p.add_argument_group("PIE-Bench (its metrics and table beside the ones above)")
    pb.add_argument("--pie-bench", metavar="FILE",
                    help="PIE-Bench mapping_file.json: items matched by id; structure, PSNR / LPIPS / MSE / SSIM "
                         "of the unedited part, CLIP whole / edited -> pie_metrics.csv, pie_summary.csv, pie_table.md")
    pb.add_argument("--images", metavar="DIR",
                    help="PIE-Bench annotation_images folder (the sources, by image_path; default: the results' sources)")
    pb.add_argument("--by-edit-type", action="store_true", help="PIE table rows per editing type too")
    pb.add_argument("--pie-sd", choices=["pie", "splice"], default=EvalSettings.pie_sd,
                    help="PIE structure-distance input: its evaluator's (0..255 values normalised, resize without "
                         "antialias) or our SD's (/255, antialiased)")
    s = p.add_argument_group("settings")
    s.add_argument("--bg-mask", default=EvalSettings.bg_mask,
                   help="BG-LPIPS background: 'own' (each method's mask.png), a METHOD name (its masks for every "
                        "method) or a DIR of <id>.png user masks; background = mask < 0.5")
    s.add_argument("--clip-resample", choices=["antialias", "torch", "pil"], default=EvalSettings.clip_resample,
                   help="CLIP resize: antialias (JAX, PIL's float filter), torch (F.interpolate, no antialias), "
                        "pil (PIL 8-bit on the host, bit-exact CLIPImageProcessor)")
    s.add_argument("--dino-size", type=int, default=EvalSettings.dino_size, help="DINO input short side")
    s.add_argument("--dino-max-size", type=int, default=EvalSettings.dino_max_size, help="DINO input long side cap")
    s.add_argument("--rd-size", type=int, help="resize images to this square size for RD (default: native size)")
    s.add_argument("--batch-size", type=int, default=EvalSettings.batch_size, help="images per jitted call")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    runtime.add_cli_arguments(s)
    return p


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The parsed flags as :class:`EvalSettings` (the runtime flags are applied by :func:`main`)."""
    return EvalSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)})


def run(args: argparse.Namespace, log=None) -> dict:
    """:func:`csg_jax.evaluation.run_evaluation` with the parsed flags."""
    return run_evaluation(settings_from_args(args), log)


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
