"""The metrics over loaded items: scorers from their weights, per-item values, RD and per-task means."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Any

import numpy as np

from csg_jax.errors import CSGError
from csg_jax.evaluation.results import Item, background_for
from csg_jax.evaluation.settings import LABELS, METRICS, EvalSettings


def _groups(items: list[Item], key) -> "OrderedDict[Any, list[Item]]":
    g: "OrderedDict[Any, list[Item]]" = OrderedDict()
    for it in items:
        g.setdefault(key(it), []).append(it)
    return g


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


# --lpips-net -> (EvalSettings field of the trunk file, load_trunk arch, the flag to ask for)
_LPIPS_TRUNKS = {"vgg": ("vgg", "vgg16", "--vgg FILE (torchvision vgg16-397923af.pth)"),
                 "alex": ("alex", "alexnet", "--alex FILE (torchvision alexnet-owt-7be5be79.pth)"),
                 "squeeze": ("squeeze", "squeezenet1_1", "--squeeze FILE (torchvision squeezenet1_1-b8a52dc0.pth)")}


def load_scorers(settings: EvalSettings, log) -> tuple[dict, dict]:
    """{metric: scorer} for every metric with weights; {metric: reason} for the skipped ones."""
    from csg_jax.metrics import scores as S

    s = settings
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

        return S.ClipSimilarity(load_clip(s.clip), resample=s.clip_resample, batch_size=s.batch_size)

    def dino():
        from csg_jax.metrics.vit import load_dino

        return S.StructureDistance(load_dino(s.dino), size=s.dino_size, max_size=s.dino_max_size,
                                   batch_size=s.batch_size)

    def vgg():
        from csg_jax.metrics.vgg import load_trunk

        cfg, params = load_trunk(s.vgg, "vgg16")
        return S.Perceptual(cfg, params, size=s.rd_size, batch_size=s.batch_size)

    def lp():
        from csg_jax.metrics.vgg import load_heads, load_trunk

        if s.lpips_net not in _LPIPS_TRUNKS:
            raise CSGError(f"unknown --lpips-net {s.lpips_net!r}; expected one of {sorted(_LPIPS_TRUNKS)}")
        field, arch, flag = _LPIPS_TRUNKS[s.lpips_net]
        trunk_file = getattr(s, field)
        if not trunk_file:
            raise CSGError(f"LPIPS ({s.lpips_net}) also needs the trunk weights: {flag}")
        cfg, trunk = load_trunk(trunk_file, arch)
        return S.LPIPSScorer(cfg, trunk, load_heads(s.lpips, cfg), batch_size=s.batch_size)

    attempt("cs", "--clip folder", s.clip, clip)
    attempt("sd", "--dino folder", s.dino, dino)
    attempt("rd", "--vgg file", s.vgg, vgg)
    attempt("bg_lpips", "--lpips file", s.lpips, lp)
    for m in METRICS:
        log(f"{LABELS[m]:>8}: " + ("computing" if m in scorers else f"skipped ({skipped[m]})"))
    return scorers, skipped


def compute(items: list[Item], scorers: dict, settings: EvalSettings, by_method: dict) -> dict:
    """Fill ``item.values`` and return {(method, task): {"rd": ..., "rd_gamma": ..., "rd_n": ...}}."""
    quiet = settings.quiet
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
            bg, desc = background_for(it, settings.bg_mask, by_method)
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
