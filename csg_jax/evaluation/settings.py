"""What one evaluation run is asked to do (:class:`EvalSettings`) and the metric names."""

from __future__ import annotations

import dataclasses
from typing import Optional

METRICS = ("cs", "sd", "rd", "bg_lpips")
LABELS = {"cs": "CS", "sd": "SD", "rd": "RD", "bg_lpips": "BG-LPIPS"}
HIGHER_IS_BETTER = {"cs": True, "sd": False, "rd": False, "bg_lpips": False}

# PIE-Bench's table: (per-item key, column label, factor to its units, higher is better); the item
# keys hold raw values (CLIP already 100 * max(cos, 0)), the table and result["pie"] the scaled ones
PIE_COLUMNS = (("structure", "Structure ×10³", 1e3, False), ("psnr", "PSNR", 1.0, True),
               ("lpips", "LPIPS ×10³", 1e3, False), ("mse", "MSE ×10⁴", 1e4, False),
               ("ssim", "SSIM ×10²", 1e2, True), ("clip_whole", "CLIP Whole", 1.0, True),
               ("clip_edited", "CLIP Edited", 1.0, True))
# PIE-Bench (Ju et al., ICLR 2024) Table: SD-1.4 + P2P, 50 steps, DDIM inversion
PIE_REFERENCE = {"method": "DDIM + P2P (PIE-Bench paper)", "structure": 69.43, "psnr": 17.87, "lpips": 208.80,
                 "mse": 219.88, "ssim": 71.14, "clip_whole": 25.01, "clip_edited": 22.44}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The inputs, weights and settings of one evaluation (``python -m csg_jax.evaluate``'s flags).

    ``results``: ``(method, folder)`` pairs, in table column order. A weight path left ``None``
    skips its metric. ``bg_mask``: "own", a method name or a folder of ``<id>.png`` user masks.
    ``pie_bench``: a PIE-Bench mapping file adds its metrics (:mod:`csg_jax.evaluation.pie`); PSNR /
    MSE / SSIM need no weights, structure needs ``dino``, LPIPS ``lpips`` (+ the trunk of
    ``lpips_net``; PIE-Bench's is "squeeze"), CLIP ``clip`` (PIE-Bench's is ViT-L/14).
    """

    results: tuple[tuple[str, str], ...]
    out: str = "out/eval"
    clip: Optional[str] = None  # transformers CLIPModel folder -> CS
    dino: Optional[str] = None  # transformers ViTModel folder -> SD
    vgg: Optional[str] = None  # torchvision vgg16 state dict -> RD (and the LPIPS vgg trunk)
    lpips: Optional[str] = None  # lpips v0.1 linear heads -> BG-LPIPS
    lpips_net: str = "vgg"  # "vgg" | "alex" | "squeeze" (PIE-Bench's)
    alex: Optional[str] = None  # torchvision alexnet state dict (lpips_net "alex")
    squeeze: Optional[str] = None  # torchvision squeezenet1_1 state dict (lpips_net "squeeze")
    pie_bench: Optional[str] = None  # PIE-Bench mapping_file.json -> the PIE metrics and table
    images: Optional[str] = None  # PIE-Bench annotation_images folder (the sources); None: the results'
    by_edit_type: bool = False  # PIE table: one row per (method, editing type) too
    pie_sd: str = "pie"  # PIE structure distance input: "pie" (its evaluator's) | "splice" (our SD's)
    bg_mask: str = "own"
    clip_resample: str = "antialias"  # "antialias" | "torch" | "pil"
    dino_size: int = 224
    dino_max_size: int = 480
    rd_size: Optional[int] = None  # None: native size
    batch_size: int = 8
    quiet: bool = False  # no progress bars

    def __post_init__(self):
        object.__setattr__(self, "results", tuple((str(m), str(d)) for m, d in self.results))

    @property
    def methods(self) -> list[str]:
        return [m for m, _ in self.results]

    def recorded(self) -> dict:
        """The settings as report.json records them."""
        return {"clip": self.clip, "dino": self.dino, "vgg": self.vgg, "lpips": self.lpips,
                "lpips_net": self.lpips_net, "alex": self.alex, "bg_mask": self.bg_mask,
                "clip_resample": self.clip_resample, "dino_size": self.dino_size,
                "dino_max_size": self.dino_max_size, "rd_size": self.rd_size, "cs": "cosine",
                "squeeze": self.squeeze, "pie_bench": self.pie_bench, "images": self.images,
                "by_edit_type": self.by_edit_type, "pie_sd": self.pie_sd}
