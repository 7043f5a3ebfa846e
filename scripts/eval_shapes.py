"""Quality of the shapes text-to-image model, by the shipped judge (issue "Shapes world", point 3).

    python scripts/eval_shapes.py --out out/eval_shapes
    python scripts/eval_shapes.py --model /work/shapes_run/model --n 16 --steps 10 --out /tmp/ev   # quick

* Samples one image per held-out caption (``world.make_batch(seed, n, split="heldout")``) with
  DDIM + CFG (:func:`csg_jax.shapes.sample.sample`, ``--steps`` 50, ``--guidance`` 5) and asks the
  judge for shape, object colour and background colour. Bars: >= 90% each.
* Localisation of the shape word's cross-attention, measured on the held-out *real* images of the
  same captions noised to ``--attn-t`` (:mod:`csg_jax.shapes.localisation`). Bar: ratio >= 2.
* The judge's own accuracy on those real images is reported too (it should be ~1).

Writes ``OUT/eval.json``, ``OUT/samples.png`` (first 64 samples, caption order) and prints a table.
``--compare OLD/eval.json`` (an eval of another model on the same captions, seed and settings)
adds a paired comparison: per attribute, how many captions gained or lost the right answer and the
exact McNemar p-value of the change (with n = 200 a 5-point change alone is within noise; the
pairing is what tells a real change).
Exit code 0 if every bar is met, 1 otherwise (``--no-fail`` to always exit 0).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run without install

import numpy as np

BARS = {"shape": 0.9, "color": 0.9, "background": 0.9, "localisation": 2.0}


def judged_accuracy(pred: dict, batch: dict) -> dict:
    """Per-head and all-three accuracy of the judge's predictions ``pred`` against the batch's labels."""
    hits = {k: pred[k] == np.asarray(batch[k]) for k in ("shape", "color", "background")}
    out = {k: float(v.mean()) for k, v in hits.items()}
    out["all"] = float(np.mean(hits["shape"] & hits["color"] & hits["background"]))
    return out


def shape_confusion(wanted: np.ndarray, judged: np.ndarray, names) -> dict:
    """Counts of (requested shape, judged shape): ``{requested: {judged: count}}`` over ``names``.
    A model that ignores the shape word shows up as one column (the blob it always draws)."""
    k = len(names)
    counts = np.zeros((k, k), int)
    np.add.at(counts, (np.asarray(wanted), np.asarray(judged)), 1)
    return {a: {b: int(counts[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}


def confusion_table(confusion: dict) -> str:
    names = list(confusion)
    lines = ["| requested \\ judged | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += [f"| {a} | " + " | ".join(str(confusion[a][b]) for b in names) + " |" for a in names]
    return "\n".join(lines)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: under "no change" each discordant caption is a fair coin,
    so p = P(a Binomial(gained + lost, 1/2) count is at least as lopsided)."""
    from math import comb

    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def paired_change(current: list[dict], baseline: list[dict]) -> dict:
    """Per attribute (and all three), captions whose judged answer turned right (``gained``) or
    wrong (``lost``) from ``baseline`` to ``current`` (``per_caption`` lists of two evals of the
    same captions, in order), with :func:`mcnemar_p`."""
    from csg_jax.shapes.world import parse_caption

    if [c["caption"] for c in current] != [c["caption"] for c in baseline]:
        raise ValueError("the two evals judged different captions: compare evals with the same --n and --seed")
    heads = ("shape", "color", "background")

    def hits(rows):
        wanted = [parse_caption(r["caption"]) for r in rows]
        per = {h: np.array([r[h] == w[h] for r, w in zip(rows, wanted)]) for h in heads}
        per["all"] = per["shape"] & per["color"] & per["background"]
        return per

    now, before = hits(current), hits(baseline)
    out = {}
    for h in (*heads, "all"):
        gained, lost = int(np.sum(now[h] & ~before[h])), int(np.sum(~now[h] & before[h]))
        out[h] = {"before": float(before[h].mean()), "now": float(now[h].mean()), "gained": gained, "lost": lost,
                  "p": mcnemar_p(gained, lost)}
    return out


def change_table(change: dict) -> str:
    lines = ["| attribute | before | now | gained | lost | McNemar p |", "|---|---|---|---|---|---|"]
    lines += [f"| {h} | {c['before']:.3f} | {c['now']:.3f} | {c['gained']} | {c['lost']} | {c['p']:.3g} |"
              for h, c in change.items()]
    return "\n".join(lines)


def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("metric", "value", "bar", "ok")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from csg_jax.shapes.model import shipped_model_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=shipped_model_dir(),
                   help="diffusers-format shapes model folder (default: the shipped one)")
    p.add_argument("--out", default="out/eval_shapes")
    p.add_argument("--n", type=int, default=200, help="held-out captions")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100, help="images per sampler call")
    p.add_argument("--attn-t", type=int, default=500, help="timestep the real images are noised to")
    p.add_argument("--judge", default=None, help="judge weights (default: the shipped ones)")
    p.add_argument("--compare", default=None, metavar="EVAL_JSON",
                   help="eval.json of another model on the same captions: adds a paired comparison")
    p.add_argument("--no-fail", action="store_true")
    args = p.parse_args(argv)
    from csg_jax.errors import run_guarded

    return run_guarded(lambda: run(args), "nothing written")


def run(args) -> int:
    from csg_jax.pipeline import load_pipeline
    from csg_jax.shapes import world
    from csg_jax.shapes.judge import load_judge
    from csg_jax.shapes.localisation import word_localisation
    from csg_jax.shapes.train_data import word_columns
    from csg_jax.shapes.sample import sample, save_grid

    baseline = _read_baseline(args) if args.compare else None
    os.makedirs(args.out, exist_ok=True)
    judge = load_judge(args.judge) if args.judge else load_judge()
    pipe = load_pipeline(args.model)
    batch = world.make_batch(args.seed, args.n, split="heldout")
    captions = batch["captions"]

    t0 = time.perf_counter()
    samples = np.concatenate([
        sample(pipe, captions[i:i + args.batch_size], args.steps, args.guidance, seed=args.seed + i)
        for i in range(0, args.n, args.batch_size)])
    sample_s = time.perf_counter() - t0
    judged = judge(samples)  # once: accuracy, confusion and per-caption names all read it
    acc = judged_accuracy(judged, batch)
    confusion = shape_confusion(batch["shape"], judged["shape"], world.SHAPES)
    real = judged_accuracy(judge(batch["images"]), batch)

    t0 = time.perf_counter()
    columns = word_columns(pipe.tokenizer, captions, ("shape", "color"))
    loc, color_loc = (word_localisation(pipe, batch["images"], batch["masks"], captions, columns[:, j], t=args.attn_t,
                                        seed=args.seed) for j in range(2))
    loc_s = time.perf_counter() - t0

    rows = [(f"{k} accuracy (samples)", f"{acc[k]:.3f}", f">= {BARS[k]}", "yes" if acc[k] >= BARS[k] else "NO")
            for k in ("shape", "color", "background")]
    rows.append(("all three (samples)", f"{acc['all']:.3f}", "", ""))
    ok_loc = loc["ratio"] >= BARS["localisation"]
    rows.append((f"shape-word attention ratio (real, t={args.attn_t})", f"{loc['ratio']:.2f}",
                 f">= {BARS['localisation']}", "yes" if ok_loc else "NO"))
    rows.append((f"object-colour-word attention ratio (real, t={args.attn_t})", f"{color_loc['ratio']:.2f}", "", ""))
    rows.append(("judge accuracy on the real images (all three)", f"{real['all']:.3f}", "", ""))
    passed = all(acc[k] >= BARS[k] for k in ("shape", "color", "background")) and ok_loc
    md = table(rows) + "\n\nShapes of the samples (rows: the caption's shape; columns: the judge's):\n\n" + \
        confusion_table(confusion)
    per_caption = [{"caption": c, **j} for c, j in zip(captions, judge.names(judged))]
    change = paired_change(per_caption, baseline["per_caption"]) if baseline else None
    if change:
        md += f"\n\nChange from {baseline['model']} (same captions):\n\n" + change_table(change)
    print(f"model {args.model}: n={args.n}, {args.steps} DDIM steps, guidance {args.guidance}")
    print(md, flush=True)

    report = {
        "model": os.path.abspath(args.model), "n": args.n, "steps": args.steps, "guidance": args.guidance,
        "seed": args.seed, "accuracy": acc, "shape_confusion": confusion, "judge_on_real": real,
        "localisation": {"ratio": loc["ratio"], "t": loc["t"], "per_layer": loc["per_layer"],
                         "measured_on": "held-out real images noised to t, conditional branch",
                         "color_word_ratio": color_loc["ratio"]},
        "bars": BARS, "passed": passed, "seconds": {"sampling": round(sample_s, 1), "localisation": round(loc_s, 1)},
        "per_caption": per_caption,
    }
    if change:
        report["change"] = {"baseline": baseline["model"], **change}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write(md + "\n")
    save_grid(os.path.join(args.out, "samples.png"), samples[:64])
    return 0 if passed or args.no_fail else 1


def _read_baseline(args) -> dict:
    """The --compare eval, checked before any sampling: same captions' settings or a clear error."""
    from csg_jax.errors import ConfigError

    try:
        with open(args.compare) as f:
            baseline = json.load(f)
        settings = {k: baseline[k] for k in ("n", "seed", "steps", "guidance")}
        baseline["per_caption"][0]["caption"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"--compare {args.compare}: not a readable eval.json of this script ({e})")
    wanted = {"n": args.n, "seed": args.seed, "steps": args.steps, "guidance": args.guidance}
    if settings != wanted:
        raise ConfigError(f"--compare {args.compare} was evaluated with {settings}, this run uses {wanted}; "
                        "pass the same --n, --seed, --steps and --guidance")
    return baseline


if __name__ == "__main__":
    sys.exit(main())
