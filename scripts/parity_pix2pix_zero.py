#!/usr/bin/env python3
"""Our Pix2Pix-Zero against the released code (pix2pixzero/pix2pix-zero), on the same tiny random
SD, clean latent x0, caption and edit direction.

Outside CI (it needs the released code and an old-diffusers virtual environment):

    python scripts/parity_pix2pix_zero.py --setup /work/venv-p2pz     # once: the oracle's venv
    git clone https://github.com/pix2pixzero/pix2pix-zero /tmp/p2pz      # the released code (src/ is used;
    #   or from a mirror without work tree: git --git-dir=MIRROR archive HEAD src | tar -x -C /tmp/p2pz)
    python scripts/parity_pix2pix_zero.py --p2pz-dir /tmp/p2pz --python /work/venv-p2pz/bin/python

The oracle (``scripts/oracles/p2pzero_released.py``) imports and runs the released
``DDIMInversion`` / ``EditingPipeline`` from the checkout; nothing of it is copied here. Both
sides start from the same x0 latent (the VAE encode and BLIP are bypassed), invert it on the
caption (our ``Editor.invert``: the released N-2 step schedule, ``inversion="official"``), then
edit with the caption as negative prompt, guidance 5 and cross-attention guidance 0.1.

The edit direction is target prompt states - source prompt states from *our* text encoder,
given to the released pipeline as ``edit_dir`` and to ours as .npy mean embeddings
(``source_sentences`` = zeros, ``target_sentences`` = the direction): both edit with
caption states + direction. In the regularised cases the released ``randrange`` draws are
replaced by the roll amounts our regulariser draws (``pix2pix_zero.regularize_noise``) in the
released call order: inversion step, round, roll, channel, pyramid level.

Prints max |ours - released| of x_T, the reconstruction and the edited latent, and relative to
max |released|; writes JSON. ``--float64-oracle`` runs the released code a second time in
float64 (each case also from our x_T) and adds: the float32 noise floor (released float32 vs
float64), ours vs float64, and a teacher-forced check of every step (ours, float32, one step
from the released float64 run's input at that step: the inversion's regularised noise and step,
the reconstruction step, the cross-attention guidance update, the edit step). Exit status 0
when every edit agrees within 1e-3 relative end to end or, with ``--float64-oracle``, every
teacher-forced step within its tolerance (STEP_TOLERANCE). Float32 noise alone grows past 1e-3
over 50 guided steps: the released code's own float32 and float64 runs differ by ~7e-3 there.

    python scripts/parity_pix2pix_zero.py --p2pz-dir /tmp/p2pz --float64-oracle   # ~13 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ORACLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oracles")
ORACLE = os.path.join(ORACLES, "p2pzero_released.py")
sys.path.insert(0, ORACLES)
from old_diffusers import make_venv  # noqa: E402  (the oracles' shared helpers; no torch import)
# diffusers 0.12.x: CrossAttention is still the UNet's attention class (the released code selects
# modules by that class name; 0.14 renamed it Attention); 0.12 imports huggingface_hub's
# cached_download (gone in 0.26)
ORACLE_PACKAGES = ["diffusers==0.12.1", "huggingface_hub==0.25.2", "transformers==4.46.3", "numpy<2", "safetensors"]
SRC = "a photo of a cat on the grass"
TGT = "a photo of a dog on the grass"
CASES = [  # name, steps, regularised inversion
    ("plain-10", 10, False),
    ("reg-10", 10, True),
    ("plain-50", 50, False),
    ("reg-50", 50, True),
]
DEFAULT_CASES = ("plain-10", "reg-10", "plain-50")
# teacher-forced per-step relative differences allowed (float32 noise on the tiny model: 4e-7..5e-5 for the
# latents and noises, up to 1e-4 for the guidance update, a small gradient step measured against itself;
# with a mistake in a step (wrong roll amounts, say) the latents differ by 1e-2)
STEP_TOLERANCE = {"inversion_eps": 1e-4, "inversion_step": 1e-4, "reconstruction_step": 1e-4, "guidance_update": 1e-3,
                  "guided_latent": 1e-4, "edit_step": 1e-4}


def released_rolls(seed: int, steps: int, side: int, channels: int) -> list:
    """[[lo, hi, amount], ...]: what our regulariser rolls by, in the released randrange call order.

    Our keys (Editor._rng -> pix2pix_zero.noise_regularizer -> regularize_noise): PRNGKey(seed),
    fold_in(., inversion step i), fold_in(., round * AC_ROLLS + roll), fold_in(., level),
    randint((channels,), 1, max(2, size // 2)). The released ddim_inv.py asks randrange(1, size // 2)
    for step i, round, roll, channel, level (auto_corr_loss: channel loop, then the pyramid).
    """
    import jax
    import numpy as np

    from csg_jax.editing import pix2pix_zero as pz

    sizes = pz.pyramid_sizes(side)
    key = jax.random.PRNGKey(seed)
    out = []
    for i in range(steps - 2):  # the official inversion: N - 2 steps (ddim_inv.py timesteps.flip(0)[1:-1])
        step_key = jax.random.fold_in(key, i)
        for j in range(pz.REG_STEPS * pz.AC_ROLLS):
            sub = jax.random.fold_in(step_key, j)
            shifts = np.stack([np.asarray(jax.random.randint(jax.random.fold_in(sub, lvl), (channels,), 1, max(2, s // 2)))
                               for lvl, s in enumerate(sizes)])  # (levels, channels)
            for ch in range(channels):
                for lvl, s in enumerate(sizes):
                    out.append([1, s // 2, int(shifts[lvl, ch])])
    return out


def ours(pipe, x0, cases, prompts0, dir_path: str, tmp: str, seed: int, warm: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from csg_jax.editing import pix2pix_zero
    from csg_jax.editing.config import EditConfig
    from csg_jax.editing.editor import Editor

    zeros = os.path.join(tmp, "zeros.npy")
    np.save(zeros, np.zeros(prompts0.source.shape[1:], np.float32))
    x = jnp.asarray(np.transpose(x0, (0, 2, 3, 1)))
    out = {}
    for name, steps, reg in cases:
        config = EditConfig.for_method("pix2pix-zero", num_steps=steps, noise_regularization=reg, seed=seed,
                                       source_sentences=zeros, target_sentences=dir_path)
        prompts = pix2pix_zero.edit_context(pipe, prompts0, config)  # target = source + direction
        editor = Editor(pipe, config, x.shape[1:3])
        t0 = time.perf_counter()
        x_T = jax.block_until_ready(editor.invert(x, prompts.source, config.seed))
        t_inv = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = jax.block_until_ready(editor.edit(x_T, prompts, config))
        t_edit = time.perf_counter() - t0
        warm_s = {}
        if warm:  # the compiled programs again (same inputs): run time without compilation
            t0 = time.perf_counter()
            jax.block_until_ready(editor.invert(x, prompts.source, config.seed))
            warm_s["ours_inversion_warm"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            jax.block_until_ready(editor.edit(x_T, prompts, config))
            warm_s["ours_edit_warm"] = round(time.perf_counter() - t0, 2)
        out[name] = {"warm_seconds": warm_s, "x_T": np.asarray(x_T), "reconstruction": np.asarray(res["reconstruction"]),
                     "edited": np.asarray(res["edited"]), "seconds_inversion": t_inv, "seconds_edit": t_edit,
                     "config": {k: config.to_dict()[k] for k in ("num_steps", "guidance_scale", "xa_guidance", "inversion",
                                                                  "noise_regularization", "negative_prompt", "seed")},
                     "_editor": editor, "_prompts": prompts, "_config": config}
    return out


def step_check(pipe, o: dict, trace, x_T_released) -> dict:
    """Teacher forcing: each of our steps (float32) from the released float64 run's own input at that
    step; max over steps of |ours - released| / max |released| per phase. Free of the chaotic growth
    of float32 noise over a run (the end-to-end numbers), so a real difference in any step shows.

    trace: the released ``NAME/trace_*`` arrays (NCHW); phases: the inversion's (regularised) noise and
    step, the reconstruction step, the cross-attention guidance update of the negative half (SGD on x_t),
    and the whole edit step (our ``pix2pix_zero.target_pass`` over that one timestep).
    """
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np

    from csg_jax.editing import pix2pix_zero
    from csg_jax.editing.config import Knobs
    from csg_jax.models.attention import AttentionControl
    from csg_jax.schedule import ddim_transfer, inversion_plan, sampling_plan

    editor, prompts, config = o["_editor"], o["_prompts"], o["_config"]
    params, sched, layers = pipe.params, editor.schedule, editor.layers
    knobs, pk = Knobs.from_config(config), pix2pix_zero.Knobs.from_config(config)
    names = tuple(l.name for l in layers.cross_layers)
    record = AttentionControl(record=tuple((n, "probs") for n in names))
    key = jax.random.PRNGKey(config.seed) if config.noise_regularization else None
    unet = lambda x, t, ctx, control=None: pipe.unet.apply({"params": params["unet"]}, x, t, ctx, control)
    nhwc = lambda a: jnp.asarray(np.transpose(np.asarray(a, np.float32), (0, 2, 3, 1)))
    nchw = lambda a: np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))
    rel = lambda a, b: float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
    pred = sched.prediction_type

    @jax.jit
    def inv_step(x, t, i, a_from, a_to):
        eps = unet(x, t, prompts.source)[0].astype(jnp.float32)
        if key is not None:
            eps = pix2pix_zero.regularize_noise(eps, jax.random.fold_in(key, i))
        return eps, ddim_transfer(eps, x, a_from, a_to, pred)

    @jax.jit
    def recon_step(x, t, a_t, a_prev):
        return ddim_transfer(unet(x, t, prompts.source)[0].astype(jnp.float32), x, a_t, a_prev, pred)

    @jax.jit
    def guided_negative(x, x_src, t):  # the negative half after target_pass's SGD step
        ref = {k: jnp.concatenate([v, v]) for k, v in unet(x_src, t, prompts.source, record)[1].items()}
        ctx = jnp.concatenate([prompts.negative, prompts.target])
        grad = jax.grad(pix2pix_zero.cross_attention_loss, argnums=2)(pipe, params, jnp.concatenate([x, x]), t, ctx,
                                                                      ref, names)
        return x - pk.xa_guidance * grad[: x.shape[0]]

    @jax.jit
    def edit_step(x, x_src, ts, prev_ts):
        one = sched.replace(timesteps=ts, prev_timesteps=prev_ts)
        return pix2pix_zero.target_pass(pipe, params, x, prompts, types.SimpleNamespace(trajectory=x_src[None]), one,
                                        layers, knobs, pk)

    worst = {k: (0.0, -1) for k in ("inversion_eps", "inversion_step", "reconstruction_step", "guidance_update",
                                    "guided_latent", "edit_step")}

    def note(k, v, i):
        if v > worst[k][0]:
            worst[k] = (v, i)

    its, a_from, a_to = inversion_plan(sched, "official" if config.inversion == "official" else "standard")
    S, E, P = (trace[f"inversion_{k}"] for k in ("sample", "eps", "prev"))
    for i in range(its.shape[0]):
        eps, nxt = inv_step(nhwc(S[i]), its[i], i, a_from[i], a_to[i])
        note("inversion_eps", rel(nchw(eps), E[i]), i)
        note("inversion_step", rel(nchw(nxt), P[i]), i)
    ts, at, ap = sampling_plan(sched)
    n = ts.shape[0]
    S, P = trace["sampling_sample"], trace["sampling_prev"]  # [reconstruction loop; edit loop]
    for i in range(n):
        x_src = nhwc(S[i])
        note("reconstruction_step", rel(nchw(recon_step(x_src, ts[i], at[i], ap[i])), P[i]), i)
        x_in = x_T_released if i == 0 else P[n + i - 1]
        post = nchw(guided_negative(nhwc(x_in), x_src, ts[i]))
        if np.abs(S[n + i] - x_in).max() > 0:  # the released update is exactly 0 where the maps equal the reference
            note("guidance_update", rel(post - x_in, S[n + i] - x_in), i)
        note("guided_latent", rel(post, S[n + i]), i)
        note("edit_step", rel(nchw(edit_step(nhwc(x_in), x_src, ts[i : i + 1], sched.prev_timesteps[i : i + 1])),
                              P[n + i]), i)
    return {k: {"max_rel": v, "step": i} for k, (v, i) in worst.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--setup", metavar="VENV", help="create the oracle's virtual environment here and stop")
    p.add_argument("--p2pz-dir", help="a checkout of pix2pixzero/pix2pix-zero (src/utils/ddim_inv.py, ...)")
    p.add_argument("--python", default="/work/venv-p2pz/bin/python", help="the oracle venv's python (%(default)s)")
    p.add_argument("--model", help="model folder (default: a tiny random SD written to a temporary folder)")
    p.add_argument("--latent", type=int, default=32, help="latent side (default %(default)s)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma-separated subset of: " + ", ".join(c[0] for c in CASES) + " (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="our regulariser's seed (the rolls given to both sides)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the oracle (%(default)s)")
    p.add_argument("--float64-oracle", action="store_true",
                   help="also run the released code in float64: the float32 noise floor (released float32 vs float64) "
                        "and ours vs the float64 run")
    p.add_argument("--warm", action="store_true", help="time a second call of our compiled invert / edit")
    p.add_argument("--keep", metavar="DIR", help="work folder to keep (job, latents, released.npz, ours.npz)")
    p.add_argument("--json", default="parity_pix2pix_zero.json", help="results file (%(default)s)")
    args = p.parse_args(argv)
    if args.setup:
        return make_venv(args.setup, ORACLE_PACKAGES)
    if not args.p2pz_dir:
        p.error("--p2pz-dir is required (a checkout of pix2pixzero/pix2pix-zero)")
    for rel in ("ddim_inv.py", "edit_pipeline.py", "scheduler.py", "cross_attention.py", "base_pipeline.py"):
        if not os.path.isfile(os.path.join(args.p2pz_dir, "src", "utils", rel)):
            p.error(f"missing {os.path.join(args.p2pz_dir, 'src', 'utils', rel)}")
    names = args.cases.split(",")
    unknown = sorted(set(names) - {c[0] for c in CASES})
    if unknown:
        p.error(f"unknown case(s) {unknown}")
    cases = [c for c in CASES if c[0] in names]

    import numpy as np

    tmp = args.keep or tempfile.mkdtemp(prefix="parity_p2pz_")
    os.makedirs(tmp, exist_ok=True)
    folder = args.model
    if folder is None:
        from csg_jax.testing import make_tiny_model

        folder = make_tiny_model(os.path.join(tmp, "tiny_sd1"))
    x0 = np.random.RandomState(0).standard_normal((1, 4, args.latent, args.latent)).astype(np.float32)
    x0_path = os.path.join(tmp, "x0.npy")
    np.save(x0_path, x0)

    # the direction comes from our text encoder; ours runs after the oracle, on the latent it used
    from csg_jax.editing.config import EditConfig
    from csg_jax.editing.editor import batch_prompts, plan_prompts
    from csg_jax.pipeline import load_pipeline

    pipe = load_pipeline(folder)
    prompts0 = batch_prompts(pipe, [plan_prompts(pipe, SRC, target_prompt=TGT)])
    direction = np.asarray(prompts0.target[0] - prompts0.source[0], np.float32)
    dir_path = os.path.join(tmp, "direction.npy")
    np.save(dir_path, direction)
    channels = int(x0.shape[1])
    job_cases = []
    for name, steps, reg in cases:
        c = EditConfig.for_method("pix2pix-zero", num_steps=steps)
        job_cases.append({"name": name, "x0": x0_path, "caption": SRC, "direction": dir_path, "steps": steps,
                          "guidance": c.guidance_scale, "xa_guidance": c.xa_guidance, "regularize": reg,
                          "rolls": released_rolls(args.seed, steps, args.latent, channels) if reg else None})
    job = {"model": folder, "p2pz_dir": args.p2pz_dir, "threads": args.threads, "cases": job_cases}
    job_path = os.path.join(tmp, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    t0 = time.perf_counter()
    subprocess.run([args.python, ORACLE, job_path, os.path.join(tmp, "released.npz")], check=True)
    t_ref = time.perf_counter() - t0
    ref = np.load(os.path.join(tmp, "released.npz"))
    x0_used = ref[f"{cases[0][0]}/x0_used"]
    d_x0 = float(np.abs(x0_used - x0).max())
    t0 = time.perf_counter()
    mine = ours(pipe, x0_used, cases, prompts0, dir_path, tmp, args.seed, args.warm)
    t_ours = time.perf_counter() - t0
    np.savez(os.path.join(tmp, "ours.npz"), **{f"{n}/{k}": v for n, d in mine.items() for k, v in d.items()
                                               if isinstance(v, np.ndarray)})
    ref64, t_ref64, t_steps = None, None, None
    if args.float64_oracle:  # the same job in double, from the latent the float32 run used; and each edit
        np.save(os.path.join(tmp, "x0_used.npy"), x0_used)  # again from our x_T (the edit stage alone)
        cases64 = []
        for c in job_cases:
            x_T_path = os.path.join(tmp, f"ours_x_T_{c['name']}.npy")
            np.save(x_T_path, np.transpose(mine[c["name"]]["x_T"], (0, 3, 1, 2)))
            cases64 += [dict(c, x0=os.path.join(tmp, "x0_used.npy"), trace=True),
                        dict(c, name=c["name"] + "@ours_x_T", x0=os.path.join(tmp, "x0_used.npy"), x_T=x_T_path)]
        job64 = dict(job, dtype="float64", cases=cases64)
        with open(os.path.join(tmp, "job64.json"), "w") as f:
            json.dump(job64, f)
        t0 = time.perf_counter()
        subprocess.run([args.python, ORACLE, os.path.join(tmp, "job64.json"), os.path.join(tmp, "released64.npz")],
                       check=True)
        t_ref64 = time.perf_counter() - t0
        ref64 = np.load(os.path.join(tmp, "released64.npz"))
        t0 = time.perf_counter()
        for name, *_ in cases:
            trace = {k[len(name) + 7:]: ref64[k] for k in ref64.files if k.startswith(f"{name}/trace_")}
            mine[name]["step_check"] = step_check(pipe, mine[name], trace, ref64[f"{name}/x_T"])
        t_steps = time.perf_counter() - t0

    rows = []
    print(f"x0: released feeds x0 / 0.18215 * 0.18215, max |x0_used - x0| = {d_x0:.2e} (ours runs on x0_used)")
    print(f"{'case':9s} {'|dx_T|':>9s} {'rel':>8s} {'|d recon|':>9s} {'rel':>8s} {'|d edit|':>9s} {'rel':>8s} "
          f"{'|edit|':>7s} {'ours inv+edit s':>15s} {'released s':>10s}")
    for name, steps, reg in cases:
        o = mine[name]
        row = {"case": name, "steps": steps, "regularized_inversion": reg, "config": o["config"]}
        for key in ("x_T", "reconstruction", "edited"):
            r = ref[f"{name}/{key}"]
            d = float(np.abs(np.transpose(o[key], (0, 3, 1, 2)) - r).max())
            row[f"max_abs_diff_{key}"] = d
            row[f"max_abs_released_{key}"] = float(np.abs(r).max())
            row[f"rel_{key}"] = d / float(np.abs(r).max())
        if ref64 is not None:
            for key in ("x_T", "reconstruction", "edited"):
                r64 = ref64[f"{name}/{key}"]
                scale = float(np.abs(r64).max())
                row[f"rel_released32_vs_released64_{key}"] = float(np.abs(ref[f"{name}/{key}"] - r64).max()) / scale
                row[f"rel_ours_vs_released64_{key}"] = float(np.abs(np.transpose(o[key], (0, 3, 1, 2)) - r64).max()) / scale
            r64s = ref64[f"{name}@ours_x_T/edited"]
            row["rel_ours_vs_released64_from_our_x_T_edited"] = (
                float(np.abs(np.transpose(o["edited"], (0, 3, 1, 2)) - r64s).max()) / float(np.abs(r64s).max()))
            row["rel_released64_from_our_x_T_vs_released64_edited"] = (
                float(np.abs(r64s - ref64[f"{name}/edited"]).max()) / float(np.abs(ref64[f"{name}/edited"]).max()))
            row["teacher_forced_steps"] = o["step_check"]
        row["seconds"] = {"ours_inversion": round(o["seconds_inversion"], 2), "ours_edit": round(o["seconds_edit"], 2),
                          "released_inversion": round(float(ref[f"{name}/seconds_inversion"]), 2),
                          "released_edit": round(float(ref[f"{name}/seconds_edit"]), 2), **o["warm_seconds"]}
        if reg:
            row["rolls"] = int(ref[f"{name}/rolls_used"])
        rows.append(row)
        s = row["seconds"]
        print(f"{name:9s} {row['max_abs_diff_x_T']:9.2e} {row['rel_x_T']:8.1e} {row['max_abs_diff_reconstruction']:9.2e} "
              f"{row['rel_reconstruction']:8.1e} {row['max_abs_diff_edited']:9.2e} {row['rel_edited']:8.1e} "
              f"{row['max_abs_released_edited']:7.2f} {s['ours_inversion']:7.1f}+{s['ours_edit']:<7.1f} "
              f"{s['released_inversion']:4.1f}+{s['released_edit']:.1f}")
    if ref64 is not None:
        print("float32 noise floor, relative to max |released float64|:")
        print(f"{'case':9s} {'x_T r32-r64':>12s} {'ours-r64':>9s} {'edit r32-r64':>13s} {'ours-r64':>9s} "
              f"{'edit ours-r64(our x_T)':>23s} {'r64(our x_T)-r64':>17s}")
        for row in rows:
            print(f"{row['case']:9s} {row['rel_released32_vs_released64_x_T']:12.1e} {row['rel_ours_vs_released64_x_T']:9.1e} "
                  f"{row['rel_released32_vs_released64_edited']:13.1e} {row['rel_ours_vs_released64_edited']:9.1e} "
                  f"{row['rel_ours_vs_released64_from_our_x_T_edited']:23.1e} "
                  f"{row['rel_released64_from_our_x_T_vs_released64_edited']:17.1e}")
        print(f"teacher-forced steps (ours float32 from the released float64 run's input at each step), "
              f"max over steps of |ours - released| / max |released|  [{t_steps:.0f} s]:")
        phases = list(rows[0]["teacher_forced_steps"])
        print(f"{'case':9s} " + " ".join(f"{k:>19s}" for k in phases))
        for row in rows:
            tf = row["teacher_forced_steps"]
            print(f"{row['case']:9s} " + " ".join(f"{tf[k]['max_rel']:10.1e} (step {tf[k]['step']:2d})" for k in phases))
    result = {"source_prompt": SRC, "target_prompt": TGT, "latent": args.latent, "model": folder, "p2pz_dir": args.p2pz_dir,
              "x0_roundtrip_max_abs": d_x0, "direction_max_abs": float(np.abs(direction).max()), "cases": rows,
              "seconds_total": {"ours (incl. compile)": round(t_ours, 1), "released (incl. load)": round(t_ref, 1),
                                **({"released float64 (2 runs a case)": round(t_ref64, 1),
                                    "ours teacher-forced steps": round(t_steps, 1)} if t_ref64 else {})},
              "work_folder": tmp}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json} (ours {t_ours:.0f} s incl. compilation, released {t_ref:.0f} s; work folder {tmp})")
    # pass: every edit within 1e-3 end to end, or (with the float64 run) every teacher-forced step within
    # STEP_TOLERANCE: past a few dozen guided steps float32 noise alone grows beyond 1e-3 (the released
    # code's own float32 and float64 runs differ so), and only the per-step check can tell it from a bug
    ok = all(r["rel_edited"] <= 1e-3 or (ref64 is not None and all(
        v["max_rel"] <= STEP_TOLERANCE[k] for k, v in r["teacher_forced_steps"].items())) for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
