"""What one evaluation run is asked to do (:class:`EvalSettings`) and the metric names."""

from __future__ import annotations

import dataclasses
from typing import Optional

METRICS = ("cs", "sd", "rd", "bg_lpips")
LABELS = {"cs": "CS", "sd": "SD", "rd": "RD", "bg_lpips": "BG-LPIPS"}
HIGHER_IS_BETTER = {"cs": True, "sd": False, "rd": False, "bg_lpips": False}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The inputs, weights and settings of one evaluation (``python -m csg_jax.evaluate``'s flags).

    ``results``: ``(method, folder)`` pairs, in table column order. A weight path left ``None``
    skips its metric. ``bg_mask``: "own", a method name or a folder of ``<id>.png`` user masks.
    """

    results: tuple[tuple[str, str], ...]
    out: str = "out/eval"
    clip: Optional[str] = None  # transformers CLIPModel folder -> CS
    dino: Optional[str] = None  # transformers ViTModel folder -> SD
    vgg: Optional[str] = None  # torchvision vgg16 state dict -> RD (and the LPIPS vgg trunk)
    lpips: Optional[str] = None  # lpips v0.1 linear heads -> BG-LPIPS
    lpips_net: str = "vgg"  # "vgg" | "alex"
    alex: Optional[str] = None  # torchvision alexnet state dict (lpips_net "alex")
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
                "dino_max_size": self.dino_max_size, "rd_size": self.rd_size, "cs": "cosine"}
