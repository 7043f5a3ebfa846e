"""EditConfig: every knob of an edit, one frozen (hashable, jit-static) dataclass.

Defaults reproduce the official CSG behaviour (``shared/docs/csg-reference.md``) except where a
named option selects the official variant (``inversion="official"``, ``encode="sample"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from csg_jax.errors import ConfigError

METHODS = ("csg", "csg-no-mixup", "ddim", "p2p", "pix2pix-zero")
INVERSIONS = ("standard", "official", "null-text")
ENCODINGS = ("mean", "sample")
NEGATIVES = ("source", "empty")
MIXUPS = ("two-pass", "single-pass")
DTYPES = ("float32", "bfloat16")
SELF_REPLACE_LAYERS = ("null-text", "stable", "scaled")
BLEND_LAYERS = ("released", "resolution")
BLEND_MAPS = ("released", "own")
TOKEN_ALIGNMENTS = ("released", "similarity")
# Each baseline's published defaults where they differ from the shared ones (CSG official).
# Pix2Pix-Zero's released inversion (ddim_inv.py): timesteps[1:-1] of the flipped schedule (our
# "official" N-2 step variant) with the regularised noise, always on in its edit_real.py.
METHOD_DEFAULTS = {"p2p": {"guidance_scale": 7.5, "negative_prompt": "empty"},
                   "pix2pix-zero": {"inversion": "official", "noise_regularization": True}}


def _bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


@dataclasses.dataclass(frozen=True)
class EditConfig:
    method: str = "csg"  # "csg" | "csg-no-mixup" | "ddim" (Eq. 3) | baselines "p2p" | "pix2pix-zero"
    num_steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: str = "source"  # official: the source prompt is the negative prompt; or "empty"
    posterior_guidance: float = 10.0  # lambda^pre of Eq. 15
    mask_res: Optional[int] = None  # None: latent size / 4 (16 for 64x64 latents, as official)
    delta: float = 1.5  # period of the cosine gate, Eq. 16
    seed: int = 0
    inversion: str = "standard"  # or "official" (N-2 steps, one index off; reproduces the paper),
    #                               or "null-text" (standard + per-step optimised negative embeddings)
    encode: str = "mean"  # VAE posterior "mean" (deterministic) or "sample" (official, seeded)
    mixup: str = "two-pass"  # official two UNet passes, or "single-pass" (mix live maps in one pass)
    dtype: str = "float32"
    # CSG two-pass mixup: keep the source pass's cross-attention maps of every step (one UNet
    # evaluation per step fewer) when they take at most this many GB per program, else recompute
    # them (memory flat in the number of steps). 0: always recompute.
    max_attention_store_gb: float = 4.0
    # -- Prompt-to-Prompt (method "p2p"; csg_jax/editing/p2p.py) --
    cross_replace_steps: float = 0.8  # fraction of steps whose target cross-attention is the source's
    self_replace_steps: float = 0.4  # fraction of steps whose coarse self-attention is the source's
    local_blend: bool = False  # keep the latent outside the source/target word maps (LocalBlend)
    blend_threshold: float = 0.3  # LocalBlend threshold on the max-normalised word maps
    blend_start: float = 0.2  # LocalBlend acts from this fraction of the steps on
    equalizer_words: Optional[str] = None  # target-prompt words to re-weight (None: the target words)
    equalizer_scale: float = 1.0  # factor on their cross-attention columns (1: no re-weighting)
    # which released behaviour (google/prompt-to-prompt; p2p.py's docstring says where each is made):
    self_replace_layers: str = "null-text"  # <= 32^2 query pixels (null-text notebook) | "stable" (<= 16^2) | "scaled"
    blend_layers: str = "released"  # LocalBlend's down[2:4] + up[:3] read as 16x16 | "resolution" (latent / 4)
    blend_maps: str = "released"  # target word's map after replacement (in-place store) | "own" (before)
    token_alignment: str = "released"  # seq_aligner's word-swap / refinement mapper | "similarity" (CSG's)
    # -- Pix2Pix-Zero (method "pix2pix-zero"; csg_jax/editing/pix2pix_zero.py) --
    xa_guidance: float = 0.1  # SGD step on x_t for the cross-attention loss
    source_sentences: Optional[str] = None  # text file, one sentence per line (edit direction);
    target_sentences: Optional[str] = None  # None: the source and target prompts themselves
    noise_regularization: bool = False  # pix2pix-zero's auto-correlation + KL regularised inversion
    # -- null-text inversion (inversion "null-text"; csg_jax/editing/null_text.py) --
    null_text_steps: int = 10  # Adam steps per timestep (early stop below 1e-5 + 2e-5 i)

    def __post_init__(self):
        checks = [("method", METHODS), ("inversion", INVERSIONS), ("encode", ENCODINGS),
                  ("negative_prompt", NEGATIVES), ("mixup", MIXUPS), ("dtype", DTYPES),
                  ("self_replace_layers", SELF_REPLACE_LAYERS), ("blend_layers", BLEND_LAYERS),
                  ("blend_maps", BLEND_MAPS), ("token_alignment", TOKEN_ALIGNMENTS)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {', '.join(allowed)}")
        if int(self.num_steps) < 3:
            raise ConfigError(f"num_steps must be at least 3, got {self.num_steps}")
        if self.mask_res is not None and int(self.mask_res) < 1:
            raise ConfigError(f"mask_res must be positive, got {self.mask_res}")
        if not float(self.max_attention_store_gb) >= 0:
            raise ConfigError(f"max_attention_store_gb must be non-negative, got {self.max_attention_store_gb}")
        if self.delta <= 0:
            raise ConfigError(f"delta must be positive, got {self.delta}")
        for name in ("cross_replace_steps", "self_replace_steps", "blend_threshold", "blend_start"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.equalizer_scale < 0:
            raise ConfigError(f"equalizer_scale must be non-negative, got {self.equalizer_scale}")
        if self.xa_guidance < 0:
            raise ConfigError(f"xa_guidance must be non-negative, got {self.xa_guidance}")
        if (self.source_sentences is None) != (self.target_sentences is None):
            raise ConfigError("give both source_sentences and target_sentences (the edit direction), or neither")
        if int(self.null_text_steps) < 1:
            raise ConfigError(f"null_text_steps must be at least 1, got {self.null_text_steps}")

    @property
    def uses_mixup(self) -> bool:
        return self.method == "csg"

    @property
    def uses_guidance(self) -> bool:
        return self.method in ("csg", "csg-no-mixup")

    def mask_resolution(self, latent_hw: tuple[int, int]) -> int:
        return int(self.mask_res) if self.mask_res else max(1, min(latent_hw) // 4)

    @classmethod
    def for_method(cls, method: str = "csg", **changes: Any) -> "EditConfig":
        """A config with the method's own published defaults (:data:`METHOD_DEFAULTS`), then ``changes``.

        ``EditConfig(method="p2p")`` keeps the shared defaults (guidance 5, source prompt as
        negative: the CSG paper's comparison setting); ``EditConfig.for_method("p2p")`` is
        Prompt-to-Prompt's own (guidance 7.5, empty negative prompt).
        """
        return cls(**{"method": method, **METHOD_DEFAULTS.get(method, {}), **changes})

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "EditConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in (d or {}).items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown edit setting(s) {unknown}; known: {sorted(names)}")
        types = {"num_steps": int, "guidance_scale": float, "posterior_guidance": float, "delta": float, "seed": int,
                 "cross_replace_steps": float, "self_replace_steps": float, "blend_threshold": float,
                 "blend_start": float, "equalizer_scale": float, "max_attention_store_gb": float, "xa_guidance": float, "null_text_steps": int,
                 "local_blend": _bool, "noise_regularization": _bool}
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
