#!/usr/bin/env python3
"""Oracle side of ``scripts/parity_p2p.py``: runs Google's *released* Prompt-to-Prompt code on a
diffusers model folder, in its own virtual environment (old diffusers; see parity_p2p.py --setup).

    python ptp_released.py JOB.json OUT.npz

JOB.json (written by parity_p2p.py): {"model": folder, "ptp_dir": a google/prompt-to-prompt
checkout (ptp_utils.py, seq_aligner.py), "controllers": the notebook (.ipynb) or its
Prompt-to-Prompt code cell saved as .py, "cases": [...]}. Nothing of the released code is copied
here: the notebook cell that defines the controllers is read from the file given and executed as
is; ptp_utils / seq_aligner are imported from the checkout. This file only loads the weights (a
folder written for new diffusers, read with old classes) and runs the notebook's sampling loop
(``ptp_utils.diffusion_step`` once per DDIM step, as its ``text2image_ldm_stable`` does; that
function itself hard-codes 512 px and a scheduler argument old diffusers lacks).
"""

from __future__ import annotations

import abc
import inspect
import json
import sys
import types
import typing

import numpy as np
import torch
import torch.nn.functional as nnf

from old_diffusers import load_components  # this script's folder

def load_model(folder: str):
    from diffusers import DDIMScheduler

    return types.SimpleNamespace(
        **load_components(folder), device="cpu",
        scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(folder, subfolder="scheduler")))


def controller_source(path: str) -> str:
    """The released code cell that defines the controllers (the one with ``class AttentionControlEdit``)."""
    if path.endswith(".py"):
        return open(path).read()
    cells = json.load(open(path))["cells"]
    for cell in cells:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and "class AttentionControlEdit" in src:
            return src
    raise SystemExit(f"{path}: no code cell defines AttentionControlEdit")


def released_namespace(src: str, model, ptp_utils, seq_aligner) -> dict:
    """Execute the notebook cell with the globals the notebook defines in earlier cells."""
    ns = {name: getattr(typing, name) for name in ("Optional", "Union", "Tuple", "List", "Callable", "Dict")}
    ns.update(torch=torch, nnf=nnf, np=np, abc=abc, ptp_utils=ptp_utils, seq_aligner=seq_aligner,
              tokenizer=model.tokenizer, device=torch.device("cpu"), LOW_RESOURCE=False, MAX_NUM_WORDS=77,
              NUM_DDIM_STEPS=50, GUIDANCE_SCALE=7.5, __name__="released_p2p")
    exec(compile(src, "<released P2P cell>", "exec"), ns)
    return ns


def run_case(ns, model, ptp_utils, case) -> dict:
    steps = int(case["steps"])
    ns["NUM_DDIM_STEPS"] = steps  # LocalBlend's start_blend and the notebook's constants read it
    prompts = case["prompts"]
    x_T = torch.from_numpy(np.load(case["x_T"])).float()  # (1, 4, h, w)
    ns["x_t"] = torch.zeros(x_T.shape)  # some versions of LocalBlend.get_mask read a global x_t's shape
    lb = None
    if case.get("blend_words"):
        params = inspect.signature(ns["LocalBlend"].__init__).parameters
        if "start_blend" in params:  # null-text notebook
            lb = ns["LocalBlend"](prompts, case["blend_words"], start_blend=case["blend_start"],
                                  th=(case["blend_threshold"], case["blend_threshold"]))
        else:  # stable notebook: acts from step 0
            lb = ns["LocalBlend"](prompts, case["blend_words"], threshold=case["blend_threshold"])
    kw = dict(cross_replace_steps=case["cross_replace_steps"], self_replace_steps=case["self_replace_steps"], local_blend=lb)
    cls = ns["AttentionReplace"] if case["replace"] else ns["AttentionRefine"]
    controller = cls(prompts, steps, **kw)
    if case.get("equalizer"):
        eq = ns["get_equalizer"](prompts[1], tuple(case["equalizer"]["words"]), tuple(case["equalizer"]["values"]))
        controller = ns["AttentionReweight"](prompts, steps, equalizer=eq, controller=controller, **kw)

    ptp_utils.register_attention_control(model, controller)
    tok = model.tokenizer
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        text = model.text_encoder(ids.input_ids)[0]
        unc = tok([""] * len(prompts), padding="max_length", max_length=ids.input_ids.shape[-1], return_tensors="pt")
        context = torch.cat([model.text_encoder(unc.input_ids)[0], text])
        latents = x_T.expand(len(prompts), *x_T.shape[1:]).clone()
        model.scheduler.set_timesteps(steps)
        for t in model.scheduler.timesteps:
            latents = ptp_utils.diffusion_step(model, controller, latents, context, t, case["guidance"], low_resource=False)
    return {f"{case['name']}/latents": latents.numpy()}


def main(argv=None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.load(open(job_path))
    torch.set_num_threads(int(job.get("threads", 1)))
    sys.path.insert(0, job["ptp_dir"])
    import ptp_utils
    import seq_aligner

    model = load_model(job["model"])
    ns = released_namespace(controller_source(job["controllers"]), model, ptp_utils, seq_aligner)
    out = {}
    for case in job["cases"]:
        out.update(run_case(ns, model, ptp_utils, case))
        print(f"released P2P: {case['name']} done", flush=True)
    np.savez(out_path, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
