"""Shared by the parity harnesses' oracles (``ptp_released.py``, ``p2pzero_released.py``): a
model folder written for new diffusers read with the old diffusers / transformers classes the
released code runs on, and the oracle venv's set-up. Torch and diffusers are imported inside the
functions: the harnesses (main environment) import this module for :func:`make_venv` only."""

from __future__ import annotations

import os
import subprocess
import sys

# old diffusers' VAE attention names (same tensors): query/key/value/proj_attn
VAE_RENAME = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def make_venv(venv: str, packages) -> int:
    """Create an oracle virtual environment: torch first (the CPU wheel on this disk), then ``packages``."""
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [os.path.join(venv, "bin", "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + list(packages), check=True)
    print(f"oracle venv ready: {venv}/bin/python")
    return 0


def load_components(folder: str) -> dict:
    """{"unet", "vae", "text_encoder", "tokenizer"} of a diffusers-format folder, eval mode, loaded
    strictly (every tensor used, none missing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    unet.load_state_dict(load_file(f"{folder}/unet/diffusion_pytorch_model.safetensors"), strict=True)
    cfg = AutoencoderKL.load_config(folder, subfolder="vae")
    cfg.pop("scaling_factor", None)  # unknown to old diffusers (the released code hard-codes 0.18215)
    vae = AutoencoderKL.from_config(cfg)
    sd = {}
    for k, v in load_file(f"{folder}/vae/diffusion_pytorch_model.safetensors").items():
        if ".mid_block.attentions." in k:
            for a, b in VAE_RENAME.items():
                k = k.replace(a, b)
        sd[k] = v
    vae.load_state_dict(sd, strict=True)
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))  # no "format" header
    text.load_state_dict(load_file(f"{folder}/text_encoder/model.safetensors"), strict=True)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
                tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
