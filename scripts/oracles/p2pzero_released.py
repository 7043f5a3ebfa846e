#!/usr/bin/env python3
"""Oracle side of ``scripts/parity_pix2pix_zero.py``: runs the *released* Pix2Pix-Zero code
(pix2pixzero/pix2pix-zero, ``src/utils``) on a diffusers model folder, in its own virtual
environment (diffusers 0.12.x: the released code finds its attention layers by the class name
``CrossAttention``; see parity_pix2pix_zero.py --setup).

    python p2pzero_released.py JOB.json OUT.npz

JOB.json (written by parity_pix2pix_zero.py)::

    {"model": folder, "p2pz_dir": a checkout of the released repository (src/utils/...),
     "threads": 1, "dtype": "float32" (or "float64": everything in double, for the noise floor),
     "cases": [{"name": str, "x0": path of a (1, 4, h, w) .npy scaled latent, "caption": str,
                "direction": path of a (77, D) .npy or null (no edit direction: zeros),
                "steps": int, "guidance": float, "xa_guidance": float, "regularize": bool,
                "rolls": [[lo, hi, value], ...] in the released call order, or null,
                "x_T": optional path of a (1, 4, h, w) .npy: the edit starts from it instead of
                       the inversion's result (the inversion still runs and is saved),
                "trace": optional bool: also save every scheduler step's input, noise prediction and
                         result (NAME/trace_inversion_*, NAME/trace_sampling_*: reconstruction loop
                         then edit loop; the edit loop's input is the negative half after the
                         cross-attention guidance step)}]}

Nothing of the released code is copied here: ``DDIMInversion`` (utils/ddim_inv.py),
``EditingPipeline`` (utils/edit_pipeline.py) and ``DDIMInverseScheduler`` (utils/scheduler.py)
are imported from the checkout and called as ``src/inversion.py`` / ``src/edit_real.py`` call
them (inversion: guidance 1, the caption; edit: the caption as prompt and as negative prompt,
``guidance_scale``, ``guidance_amount`` = xa guidance, ``edit_dir`` (1, 77, D), ``x_in`` the
inverted latent). What this file changes, and nothing else:

* the weights are loaded from a folder written for new diffusers with the old classes (VAE
  mid-block attention names, a text-encoder file without the "format" header);
* the VAE *encode* of the inversion is bypassed: ``vae.encode`` of that pipeline's instance
  returns a posterior whose ``sample()`` is ``x0 / 0.18215``, so that ``ddim_inv.py`` line
  ``latents = x0_enc = 0.18215 * x0_enc`` gives back the given latent (to one float32 rounding:
  the latent actually used is saved as ``x0_used``); the ``img`` argument is a zero array of the
  image size (only its shape matters then). No BLIP: the caption is given;
* ``decode_latents`` of each pipeline instance is wrapped to record the latents it is handed
  (the edit pipeline decodes the reconstruction, then the edit) before decoding as before;
* with ``regularize`` false the inversion is called with ``lambda_ac=0, lambda_kl=0`` (the
  released code skips each regulariser when its lambda is not > 0; its defaults, 20 and 20, are
  what inversion.py uses); with ``rolls`` the module global ``randrange`` of ddim_inv.py is
  replaced by a function that returns the given amounts in call order and asserts that each
  call asks for the range given with it.

Outputs per case: ``NAME/x0_used``, ``NAME/x_T`` (1, 4, h, w) the inversion,
``NAME/reconstruction`` and ``NAME/edited`` (1, 4, h, w) latents before the VAE decode,
``NAME/seconds_inversion``, ``NAME/seconds_edit``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import types

import numpy as np
import torch

from old_diffusers import load_components  # this script's folder

# diffusers 0.12's VAE attention names (same tensors): query/key/value/proj_attn
SCALE = 0.18215  # hard-coded in the released ddim_inv.py / base_pipeline.py


def build(cls, components: dict, scheduler):
    """A released pipeline class from components (StableDiffusionPipeline's constructor)."""
    return cls(scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
               **components)


def record_decodes(pipe) -> list:
    """Wrap this instance's decode_latents: the latents it decodes are appended to the list returned."""
    seen, original = [], pipe.decode_latents

    def decode_latents(latents):
        seen.append(latents.detach().clone())
        return original(latents)

    pipe.decode_latents = decode_latents
    return seen


def record_steps(pipe) -> list:
    """Wrap this instance's scheduler.step (signature kept, so prepare_extra_step_kwargs sees the
    same parameters): each call's (sample, model_output, prev_sample) is appended to the list."""
    seen, original = [], pipe.scheduler.step

    @functools.wraps(original)
    def step(model_output, timestep, sample, *args, **kwargs):
        res = original(model_output, timestep, sample, *args, **kwargs)
        seen.append(tuple(v.detach().clone() for v in (sample, model_output, res.prev_sample)))
        return res

    pipe.scheduler.step = step
    return seen


def bypass_encode(pipe, x0: torch.Tensor) -> None:
    """This instance's vae.encode(image) -> a posterior whose sample() is x0 / 0.18215."""
    posterior = types.SimpleNamespace(sample=lambda *a, **k: x0 / SCALE)
    pipe.vae.encode = lambda *a, **k: types.SimpleNamespace(latent_dist=posterior)


class ScriptedRandrange:
    """Stands in for ``random.randrange`` in ddim_inv.py: the given amounts, in call order."""

    def __init__(self, rolls):
        self.rolls, self.i = [tuple(int(v) for v in r) for r in rolls], 0

    def __call__(self, start, stop=None):
        lo, hi = (0, start) if stop is None else (start, stop)
        if self.i >= len(self.rolls):
            raise AssertionError(f"randrange call {self.i}: more calls than the {len(self.rolls)} amounts given")
        want_lo, want_hi, value = self.rolls[self.i]
        if (lo, hi) != (want_lo, want_hi):
            raise AssertionError(f"randrange call {self.i}: asked for [{lo}, {hi}), the harness expected "
                                 f"[{want_lo}, {want_hi})")
        if not lo <= value < hi:
            raise AssertionError(f"randrange call {self.i}: amount {value} outside [{lo}, {hi})")
        self.i += 1
        return value


def run_case(mods, components, case) -> dict:
    ddim_inv, edit_pipeline, scheduler_mod = mods
    from diffusers import DDIMScheduler

    name = case["name"]
    steps = int(case["steps"])
    sched_cfg = DDIMScheduler.load_config(case["model"], subfolder="scheduler")
    dtype = case["dtype"]
    x0 = torch.from_numpy(np.load(case["x0"])).to(dtype)
    _, _, h, w = x0.shape

    # -- inversion, as src/inversion.py calls it (guidance 1, the caption) --
    inv = build(ddim_inv.DDIMInversion, components, scheduler_mod.DDIMInverseScheduler.from_config(sched_cfg))
    bypass_encode(inv, x0)
    inv_decodes = record_decodes(inv)
    inv_steps = record_steps(inv) if case.get("trace") else None
    factor = inv.vae_scale_factor
    img = np.zeros((h * factor, w * factor, 3), np.uint8)  # only its shape reaches the (bypassed) encoder
    scripted = None
    original_randrange = ddim_inv.randrange
    if case.get("rolls"):
        scripted = ddim_inv.randrange = ScriptedRandrange(case["rolls"])
    reg = {} if case["regularize"] else {"lambda_ac": 0.0, "lambda_kl": 0.0}
    t0 = time.perf_counter()
    try:
        x_inv, _, _ = inv(case["caption"], guidance_scale=1, num_inversion_steps=steps, img=img,
                          torch_dtype=dtype, **reg)
    finally:
        ddim_inv.randrange = original_randrange
    t_inv = time.perf_counter() - t0
    if scripted is not None and scripted.i != len(scripted.rolls):
        raise AssertionError(f"{name}: the inversion drew {scripted.i} roll amounts, {len(scripted.rolls)} were given")
    x0_used = inv_decodes[0]  # ddim_inv.py decodes x0_enc (= the latent the inversion starts from) first

    # -- edit, as src/edit_real.py calls it --
    del components["vae"].encode  # undo the bypass (the instance attribute set by bypass_encode)
    pipe = build(edit_pipeline.EditingPipeline, components, DDIMScheduler.from_config(sched_cfg))
    decodes = record_decodes(pipe)
    edit_steps = record_steps(pipe) if case.get("trace") else None
    d = components["text_encoder"].config.hidden_size
    direction = (torch.from_numpy(np.load(case["direction"])).to(dtype) if case.get("direction")
                 else torch.zeros(77, d, dtype=dtype)).reshape(1, 77, d)
    t0 = time.perf_counter()
    x_start = torch.from_numpy(np.load(case["x_T"])).to(dtype) if case.get("x_T") else x_inv
    pipe(case["caption"], num_inference_steps=steps, x_in=x_start[0].unsqueeze(0), edit_dir=direction,
         guidance_amount=float(case["xa_guidance"]), guidance_scale=float(case["guidance"]),
         negative_prompt=case["caption"])
    t_edit = time.perf_counter() - t0
    if len(decodes) != 2:
        raise AssertionError(f"{name}: expected 2 decodes (reconstruction, edit), saw {len(decodes)}")
    out = {"x0_used": x0_used, "x_T": x_inv, "reconstruction": decodes[0], "edited": decodes[1]}
    if inv_steps is not None:  # per scheduler step: its input latent, noise prediction (guided,
        # regularised) and result; the edit pipeline's steps are the reconstruction loop, then the edit loop
        for key, steps_seen in (("inversion", inv_steps), ("sampling", edit_steps)):
            for j, part in enumerate(("sample", "eps", "prev")):
                out[f"trace_{key}_{part}"] = torch.stack([s[j] for s in steps_seen])
    out = {f"{name}/{k}": v.detach().cpu().numpy() for k, v in out.items()}
    out[f"{name}/x0_used"] = out[f"{name}/x0_used"].astype(np.float32)
    out[f"{name}/seconds_inversion"] = np.float64(t_inv)
    out[f"{name}/seconds_edit"] = np.float64(t_edit)
    if scripted is not None:
        out[f"{name}/rolls_used"] = np.int64(scripted.i)
    return out


def main(argv=None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.load(open(job_path))
    torch.set_num_threads(int(job.get("threads", 1)))
    torch.manual_seed(0)
    src = os.path.join(job["p2pz_dir"], "src")
    # the released modules import their siblings as top-level modules (sys.path.insert(0, "src/utils"))
    sys.path[:0] = [src, os.path.join(src, "utils")]
    from utils import ddim_inv, edit_pipeline
    from utils import scheduler as scheduler_mod

    dtype = {"float32": torch.float32, "float64": torch.float64}[job.get("dtype", "float32")]
    if dtype == torch.float64:  # transformers' CLIP builds its causal mask with torch.full in the default dtype
        torch.set_default_dtype(torch.float64)
    components = load_components(job["model"])
    for k in ("vae", "text_encoder", "unet"):
        components[k] = components[k].to(dtype)
    out = {}
    for case in job["cases"]:
        case = dict(case, model=job["model"], dtype=dtype)
        out.update(run_case((ddim_inv, edit_pipeline, scheduler_mod), components, case))
        print(f"released pix2pix-zero: {case['name']} done "
              f"(inversion {float(out[case['name'] + '/seconds_inversion']):.1f} s, "
              f"edit {float(out[case['name'] + '/seconds_edit']):.1f} s)", flush=True)
    np.savez(out_path, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
