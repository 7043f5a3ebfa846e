#!/usr/bin/env python3
"""Our Prompt-to-Prompt against Google's released code, on the same tiny random SD and x_T.

Outside CI (it needs the released code and an old-diffusers virtual environment):

    python scripts/parity_p2p.py --setup /work/venv-ptp          # once: the oracle's venv
    git clone https://github.com/google/prompt-to-prompt /tmp/ptp  # the released code
    python scripts/parity_p2p.py --ptp-dir /tmp/ptp --python /work/venv-ptp/bin/python

``--controllers`` picks the released file whose controller cell runs (default: the null-text
notebook, ``null_text_w_ptp.ipynb``; ``prompt-to-prompt_stable.ipynb`` with our
``--self-replace-layers stable``-style settings for the stable notebook, or a .py holding that
cell). The oracle (``scripts/oracles/ptp_released.py``) executes the cell as it is and imports
ptp_utils / seq_aligner from the checkout; nothing of it is copied here. Cases: word swap at 10
and 50 steps, LocalBlend at a threshold that masks part of the image, re-weighting, refinement
(an added word). Prints max |ours - released| of the edit latents per case and writes JSON.
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
ORACLE = os.path.join(ORACLES, "ptp_released.py")
sys.path.insert(0, ORACLES)
from old_diffusers import make_venv  # noqa: E402  (the oracles' shared helpers; no torch import)
# the oracle's environment: old diffusers with CrossAttention.reshape_heads_to_batch_dim and
# attn2(x, context=...) calls (what ptp_utils.register_attention_control patches)
ORACLE_PACKAGES = ["diffusers==0.10.2", "huggingface_hub==0.25.2", "transformers==4.46.3", "numpy<2", "safetensors",
                   "ftfy", "tqdm", "opencv-python-headless==4.10.0.84", "ipython"]
SRC = "a photo of a cat on the grass"
CASES = [  # name, target prompt, steps, extra settings
    ("swap-10", "a photo of a dog on the grass", 10, {}),
    ("swap-50", "a photo of a dog on the grass", 50, {}),
    ("blend-10", "a photo of a dog on the grass", 10, {"local_blend": True, "blend_threshold": 0.5}),
    ("reweight-10", "a photo of a dog on the grass", 10, {"equalizer_words": "dog", "equalizer_scale": 2.0}),
    ("refine-10", "a photo of a big cat on the grass", 10, {}),
]


def ours(folder: str, x_T, cases, settings: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from csg_jax.editing.config import EditConfig
    from csg_jax.editing.editor import Editor, plan_prompts, prepare_prompts
    from csg_jax.pipeline import load_pipeline

    pipe = load_pipeline(folder)
    x = jnp.asarray(np.transpose(x_T, (0, 2, 3, 1)))
    out = {}
    for name, target, steps, extra in cases:
        config = EditConfig.for_method("p2p", num_steps=steps, **{**settings, **extra})
        plan = plan_prompts(pipe, SRC, target_prompt=target, negative="empty")
        prompts = prepare_prompts(pipe, [plan], config)
        res = Editor(pipe, config, x.shape[1:3]).edit(x, prompts, config)
        out[name] = {k: np.asarray(v) for k, v in res.items()}
        out[name]["plan"] = plan
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--setup", metavar="VENV", help="create the oracle's virtual environment here and stop")
    p.add_argument("--ptp-dir", help="a checkout of google/prompt-to-prompt (ptp_utils.py, seq_aligner.py, notebooks)")
    p.add_argument("--controllers", help="notebook or .py with the controller cell (default: PTP_DIR/null_text_w_ptp.ipynb)")
    p.add_argument("--python", default="/work/venv-ptp/bin/python", help="the oracle venv's python (%(default)s)")
    p.add_argument("--model", help="model folder (default: a tiny random SD written to a temporary folder)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: the released code's 512 px)")
    p.add_argument("--cases", help="comma-separated subset of: " + ", ".join(c[0] for c in CASES))
    p.add_argument("--self-replace-layers", default=None, help="our setting for the run (default: ours)")
    p.add_argument("--blend-start", type=float, default=None, help="our setting (the stable notebook: 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another of our settings, e.g. --set self_replace_layers=scaled --set blend_maps=own "
                        "(our earlier behaviour, to see the harness tell them apart)")
    p.add_argument("--json", default="parity_p2p.json", help="results file (%(default)s)")
    args = p.parse_args(argv)
    if args.setup:
        return make_venv(args.setup, ORACLE_PACKAGES)
    if not args.ptp_dir:
        p.error("--ptp-dir is required (a checkout of google/prompt-to-prompt)")
    controllers = args.controllers or os.path.join(args.ptp_dir, "null_text_w_ptp.ipynb")
    for path in (os.path.join(args.ptp_dir, "ptp_utils.py"), os.path.join(args.ptp_dir, "seq_aligner.py"), controllers):
        if not os.path.isfile(path):
            p.error(f"missing {path}")

    import numpy as np

    tmp = tempfile.mkdtemp(prefix="parity_p2p_")
    folder = args.model
    if folder is None:
        from csg_jax.testing import make_tiny_model

        folder = make_tiny_model(os.path.join(tmp, "tiny_sd1"))
    x_T = np.random.RandomState(0).standard_normal((1, 4, args.latent, args.latent)).astype(np.float32)
    np.save(os.path.join(tmp, "x_T.npy"), x_T)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    settings = {k: v for k, v in (("self_replace_layers", args.self_replace_layers), ("blend_start", args.blend_start))
                if v is not None}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = value
    if args.set:  # typed as the config file reader types them
        from csg_jax.editing.config import EditConfig

        settings = {k: getattr(EditConfig.from_dict(settings), k) for k in settings}

    t0 = time.perf_counter()
    mine = ours(folder, x_T, cases, settings)
    t_ours = time.perf_counter() - t0
    job_cases = []
    for name, target, steps, extra in cases:
        from csg_jax.editing.config import EditConfig

        c = EditConfig.for_method("p2p", num_steps=steps, **{**settings, **extra})
        plan = mine[name]["plan"]
        job_cases.append({
            "name": name, "prompts": [SRC, target], "steps": steps, "guidance": c.guidance_scale, "x_T": os.path.join(tmp, "x_T.npy"),
            "cross_replace_steps": c.cross_replace_steps, "self_replace_steps": c.self_replace_steps,
            "replace": len(SRC.split(" ")) == len(target.split(" ")),
            "blend_words": [[plan.source_word], plan.target_words.split()] if c.local_blend else None,
            "blend_threshold": c.blend_threshold, "blend_start": c.blend_start,
            "equalizer": {"words": c.equalizer_words.split(), "values": [c.equalizer_scale] * len(c.equalizer_words.split())}
            if c.equalizer_words else None})
    job = {"model": folder, "ptp_dir": args.ptp_dir, "controllers": controllers, "cases": job_cases}
    with open(os.path.join(tmp, "job.json"), "w") as f:
        json.dump(job, f)
    t0 = time.perf_counter()
    subprocess.run([args.python, ORACLE, os.path.join(tmp, "job.json"), os.path.join(tmp, "released.npz")], check=True)
    t_ref = time.perf_counter() - t0
    ref = np.load(os.path.join(tmp, "released.npz"))

    rows = []
    print(f"{'case':12s} {'max |diff| edit':>16s} {'rel':>9s} {'max |diff| recon':>17s} {'max |latent|':>12s} {'mask frac':>9s}")
    for name, *_ in cases:
        r = np.transpose(ref[f"{name}/latents"], (0, 2, 3, 1))  # (2, h, w, 4): source branch, edit
        o = mine[name]
        d_edit = float(np.abs(o["edited"][0] - r[1]).max())
        d_rec = float(np.abs(o["reconstruction"][0] - r[0]).max())
        scale = float(np.abs(r[1]).max())
        frac = float(np.mean(o["mask"])) if name.startswith("blend") else None
        rows.append({"case": name, "max_abs_diff_edit": d_edit, "rel_edit": d_edit / scale, "max_abs_diff_reconstruction": d_rec,
                     "max_abs_latent": scale, "blend_mask_fraction": frac})
        print(f"{name:12s} {d_edit:16.3e} {d_edit / scale:9.2e} {d_rec:17.3e} {scale:12.2f} "
              f"{'' if frac is None else f'{frac:9.3f}'}")
    result = {"controllers": controllers, "latent": args.latent, "settings": settings, "cases": rows,
              "seconds": {"ours": round(t_ours, 1), "released": round(t_ref, 1)}}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json} (ours {t_ours:.0f} s, released {t_ref:.0f} s)")
    worst = max(r["rel_edit"] for r in rows)
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
