"""EditConfig: every knob of an edit, one frozen (hashable, jit-static) dataclass.

Defaults reproduce the official CSG behaviour (``shared/docs/csg-reference.md``) except where a
named option selects the official variant (``inversion="official"``, ``encode="sample"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from csg_jax.errors import ConfigError

METHODS = ("csg", "csg-no-mixup", "ddim")
INVERSIONS = ("standard", "official")
ENCODINGS = ("mean", "sample")
NEGATIVES = ("source", "empty")
MIXUPS = ("two-pass", "single-pass")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EditConfig:
    method: str = "csg"  # "csg" | "csg-no-mixup" | "ddim" (Eq. 3)
    num_steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = "source"  # official: the source prompt is the negative prompt; or "empty"
    posterior_guidance: float = 10.0  # lambda^pre of Eq. 15
    mask_res: Optional[int] = None  # None: latent size / 4 (16 for 64x64 latents, as official)
    delta: float = 1.5  # period of the cosine gate, Eq. 16
    seed: int = 0
    inversion: str = "standard"  # or "official" (N-2 steps, one index off; reproduces the paper)
    encode: str = "mean"  # VAE posterior "mean" (deterministic) or "sample" (official, seeded)
    mixup: str = "two-pass"  # official two UNet passes, or "single-pass" (mix live maps in one pass)
    dtype: str = "float32"

    def __post_init__(self):
        checks = [("method", METHODS), ("inversion", INVERSIONS), ("encode", ENCODINGS),
                  ("negative_prompt", NEGATIVES), ("mixup", MIXUPS), ("dtype", DTYPES)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {', '.join(allowed)}")
        if int(self.num_steps) < 3:
            raise ConfigError(f"num_steps must be at least 3, got {self.num_steps}")
        if self.mask_res is not None and int(self.mask_res) < 1:
            raise ConfigError(f"mask_res must be positive, got {self.mask_res}")
        if self.delta <= 0:
            raise ConfigError(f"delta must be positive, got {self.delta}")

    @property
    def uses_mixup(self) -> bool:
        return self.method == "csg"

    @property
    def uses_guidance(self) -> bool:
        return self.method in ("csg", "csg-no-mixup")

    def mask_resolution(self, latent_hw: tuple[int, int]) -> int:
        return int(self.mask_res) if self.mask_res else max(1, min(latent_hw) // 4)

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "EditConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in (d or {}).items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown edit setting(s) {unknown}; known: {sorted(names)}")
        types = {"num_steps": int, "guidance_scale": float, "posterior_guidance": float, "delta": float, "seed": int}
        try:
            d = {k: (types[k](v) if k in types else v) for k, v in d.items()}
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> "EditConfig":
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        return cls.from_dict(data.get("edit", data), source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
