"""EditConfig: every setting of an edit, one frozen (hashable, jit-static) dataclass.

The shared settings are declared here; each method's own options are declared in its plug-in
module (``Options``) and nested under its ``OPTIONS_KEY`` (``config.p2p.local_blend``; YAML nests
the same way). Flat names keep working everywhere a setting is named -- ``EditConfig(local_blend=True)``,
``config.replace(cross_replace_steps=0.5)``, ``config.local_blend``, flat YAML / CSV keys -- since
every setting's name is unique. ``to_dict`` is flat (meta.json's ``settings``).

Defaults reproduce the official CSG behaviour (``shared/docs/csg-reference.md``) except where a
named option selects the official variant (``inversion="official"``, ``encode="sample"``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import numpy as np

from csg_jax.editing import registry, schema
from csg_jax.editing.schema import at_least, knob, positive
from csg_jax.errors import ConfigError


def _method_check(v) -> Optional[str]:
    return None if v in registry.METHODS else f"not supported; choose one of {', '.join(registry.METHODS)}"


@dataclasses.dataclass(frozen=True, init=False)
class _Shared:
    """Settings every method has. (EditConfig = these + one nested group per method's Options.)"""

    method: str = knob("csg", "static", "editing method: " + "; ".join(f"{k}: {e.summary}" for k, e in registry.METHODS.items()),
                       check=_method_check)
    num_steps: int = knob(50, "static", "DDIM steps", check=at_least(3), flag="--steps", aliases=("steps",))
    guidance_scale: float = knob(5.0, "image", "classifier-free guidance scale")
    negative_prompt: str = knob("source", "host", "negative prompt: the source prompt (official) or empty",
                                choices=("source", "empty"), flag="--negative", aliases=("negative",))
    mask_res: Optional[int] = knob(None, "static", "cross-attention resolution of the mask (default latent size / 4, "
                                   "16 for 64x64 latents, as official)", type=int, check=positive)
    seed: int = knob(0, "host", "seed (x_T of --generate; VAE sampling with --encode sample; noise regularisation rolls)")
    inversion: str = knob("standard", "static", "DDIM inversion: standard, the authors' N-2 step variant "
                          "(reproduces the paper), null-text (standard + per-step optimised negative embeddings) or "
                          "direct (standard; the source branch follows its trajectory exactly: Direct Inversion, "
                          "Ju et al. 2024)",
                          choices=("standard", "official", "null-text", "direct"), flag="--inversion-variant",
                          aliases=("inversion_variant",))
    encode: str = knob("mean", "host", "VAE posterior mean (deterministic) or a seeded sample (official)",
                       choices=("mean", "sample"))
    dtype: str = knob("float32", "static", "activation dtype", choices=("float32", "bfloat16"))
    noise_regularization: bool = knob(False, "static", "Pix2Pix-Zero's auto-correlation + KL regularisation of the "
                                      "inversion's noise (any method; on by default for pix2pix-zero, as released)")
    null_text_steps: int = knob(10, "static", "null-text: Adam steps per timestep (early stop below 1e-5 + 2e-5 i)",
                                check=at_least(1))

    def __init__(self, **settings: Any):
        own = {f.name: f for f in dataclasses.fields(self)}
        values, nested = {}, {g: {} for g in _GROUPS}
        for k, v in settings.items():
            if k in own:
                values[k] = v
            elif k in _FLAT:
                nested[_FLAT[k]][k] = v
            else:
                raise ConfigError(f"unknown edit setting {k!r}; known: {', '.join(sorted(set(own) | set(_FLAT)))}")
        for name, f in own.items():
            if schema.is_group(f):
                obj = values.get(name, f.default_factory())
                if isinstance(obj, dict):
                    obj = f.default_factory(**obj)
                if nested[name]:
                    obj = dataclasses.replace(obj, **nested[name])
                object.__setattr__(self, name, obj)
            else:
                object.__setattr__(self, name, values.get(name, f.default))
        schema.validate(own["method"], self.method)
        implied = dict(registry.entry(self.method).implies)
        for g in _GROUPS:  # settings the method's name implies (e.g. csg-no-mixup: mixup "none")
            mine = {k: v for k, v in implied.items() if _FLAT.get(k) == g}
            if mine:
                object.__setattr__(self, g, dataclasses.replace(getattr(self, g), **mine))
        for group, f in schema.leaves(self):
            schema.validate(f, getattr(self if group is None else getattr(self, group), f.name))

    def __getattr__(self, name: str):
        """Flat access to a method option (``config.local_blend`` = ``config.p2p.local_blend``)."""
        group = _FLAT.get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        return getattr(getattr(self, group), name)

    def mask_resolution(self, latent_hw: tuple[int, int]) -> int:
        return int(self.mask_res) if self.mask_res else max(1, min(latent_hw) // 4)

    @classmethod
    def for_method(cls, method: str = "csg", **changes: Any) -> "EditConfig":
        """A config with the method's own published defaults (its plug-in's ``DEFAULTS``), then ``changes``.

        ``EditConfig(method="p2p")`` keeps the shared defaults (guidance 5, source prompt as
        negative: the CSG paper's comparison setting); ``EditConfig.for_method("p2p")`` is
        Prompt-to-Prompt's own (guidance 7.5, empty negative prompt).
        """
        return cls(**{"method": method, **registry.module(method).DEFAULTS, **changes})

    def replace(self, **changes: Any) -> "EditConfig":
        """A copy with ``changes`` (flat or group names). A new method drops the old one's implied settings."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if changes.get("method", self.method) != self.method:
            defaults = {f.name: f.default for _, f in schema.leaves(self)}
            for k, _ in registry.entry(self.method).implies:
                if k not in changes:
                    changes[k] = defaults[k]
        return type(self)(**{**current, **changes})

    def static(self) -> "EditConfig":
        """The part that shapes the compiled program (traced and host settings at their defaults)."""
        return schema.static_part(self)

    @classmethod
    def from_dict(cls, d: Optional[dict], source: str = "config") -> "EditConfig":
        """From YAML / JSON / CSV values: nested groups or flat names, aliases, strings coerced."""
        changes = {}
        for k, v in (d or {}).items():
            k = str(k).strip().replace("-", "_")
            if k in _GROUPS and isinstance(v, dict):
                items = [(str(kk).strip().replace("-", "_"), vv) for kk, vv in v.items()]
                for kk, _ in items:
                    if _FLAT.get(_ALIASES.get(kk, kk)) != k:
                        raise ConfigError(f"{source}: {k}.{kk} is not a {k} option; {k} options: "
                                          f"{', '.join(n for n, g in _FLAT.items() if g == k)}")
            else:
                items = [(k, v)]
            for kk, vv in items:
                name = cls.canonical_name(kk)
                if name not in _LEAVES:
                    raise ConfigError(f"{source}: unknown edit setting {kk!r}; known: {', '.join(sorted(_LEAVES))}")
                try:
                    changes[name] = schema.coerce(_LEAVES[name], vv)
                except ValueError as e:
                    raise ConfigError(f"{source}: {e}") from None
        return cls(**changes)

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
        """Flat {setting: value} (meta.json's ``settings``)."""
        return {f.name: getattr(self if g is None else getattr(self, g), f.name) for g, f in schema.leaves(self)}

    @staticmethod
    def canonical_name(name: str) -> str:
        """A setting's name from a file's spelling: dashes, aliases such as ``steps``, or dotted
        ``group.name`` (a CSV header's ``p2p.blend_start``)."""
        name = str(name).strip().replace("-", "_")
        group, dot, leaf = name.rpartition(".")
        if dot and _FLAT.get(_ALIASES.get(leaf, leaf)) == group:
            name = leaf
        return _ALIASES.get(name, name)


def _option_groups() -> list:
    out = []
    for mod in registry.modules():
        if getattr(mod, "Options", None) is not None:
            out.append((mod.OPTIONS_KEY, mod.Options, schema.group(mod.Options)))
    return out


EditConfig = dataclasses.make_dataclass("EditConfig", _option_groups(), bases=(_Shared,), frozen=True, init=False)
EditConfig.__module__ = __name__
EditConfig.__doc__ = __doc__.split("\n\n")[0] + "\n\nGroups: " + ", ".join(g for g, _, _ in _option_groups()) + "."
_GROUPS = tuple(f.name for f in dataclasses.fields(EditConfig) if schema.is_group(f))
_LEAVES = {f.name: f for _, f in schema.leaves(EditConfig)}
_FLAT = {f.name: g for g, f in schema.leaves(EditConfig) if g is not None}  # option name -> its group
_ALIASES = {a: f.name for f in _LEAVES.values() for a in f.metadata["aliases"]}
if len(_LEAVES) != sum(1 for _ in schema.leaves(EditConfig)):
    raise RuntimeError("two settings share a name: flat names must be unique across method options")
METHODS = registry.names()


def fields_of_kind(*kinds: str) -> tuple[str, ...]:
    """Names of the settings of these kinds, in declaration order."""
    return tuple(n for n, f in _LEAVES.items() if f.metadata["kind"] in kinds)


class Knobs(collections.namedtuple("Knobs", fields_of_kind("image"))):
    """The ``image`` settings as float32 arrays (sweeping them does not recompile): each a scalar
    () shared by the batch, or (B,) with one value per image (dataset items that override them).
    Fields in declaration order: guidance_scale, then the methods' (CSG's posterior_guidance, delta)."""

    __slots__ = ()

    @classmethod
    def from_config(cls, config) -> "Knobs":
        import jax.numpy as jnp

        return cls(*(jnp.asarray(getattr(config, n), jnp.float32) for n in cls._fields))

    @classmethod
    def stack(cls, configs) -> "Knobs":
        """(B,) float32 numpy arrays, one value per config (host arrays, ready for device_put)."""
        return cls(*(np.asarray([getattr(c, n) for c in configs], np.float32) for n in cls._fields))
