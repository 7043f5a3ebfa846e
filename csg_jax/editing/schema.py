"""Settings declared once: a field's default, kind, type, choices, check, help and flag.

Every edit setting is a dataclass field made with :func:`knob`; its metadata says how the rest
of the package treats it, so nothing keeps a hand-written list of fields:

* ``static`` -- shapes the compiled program (an :class:`~csg_jax.editing.editor.Editor` is
  compiled per static part of a config, :func:`static_part`);
* ``image`` -- traced, one value per image ((B,) arrays: items of a dataset batch may differ);
* ``batch`` -- traced, one value per compiled call (items that differ go to different batches of
  the same program);
* ``host`` -- read on the host while the inputs are built (prompts, seeds), per item.

:func:`coerce` turns YAML / JSON / CSV / command-line values into the declared type (CSV gives
strings: ``"0.5"``, ``"false"``, ``"10"``); :func:`add_arguments` makes the command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator, Optional

from csg_jax.errors import ConfigError

KINDS = ("static", "image", "batch", "host")
TRACED = ("image", "batch")


def knob(default: Any, kind: str, help: str, *, type: Optional[type] = None, choices: Optional[tuple] = None,
         check: Optional[Callable[[Any], Optional[str]]] = None, flag: Optional[str] = None,
         aliases: tuple = ()) -> Any:
    """A settings field. ``type`` defaults to the default's type (give it where the default is
    None); ``check(value)`` returns a message when the value is invalid; ``flag`` is the command-line
    flag (default ``--name-with-dashes``; "" for none); ``aliases`` other names accepted in files."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    meta = {"kind": kind, "help": help, "type": type or default.__class__, "choices": choices, "check": check,
            "flag": flag, "aliases": tuple(aliases), "optional": default is None}
    return dataclasses.field(default=default, metadata=meta)


def group(cls) -> Any:
    """A field holding a nested settings dataclass (one method's options)."""
    return dataclasses.field(default_factory=cls, metadata={"kind": "group"})


def is_group(f: dataclasses.Field) -> bool:
    return f.metadata.get("kind") == "group"


def leaves(cls_or_obj) -> Iterator[tuple[Optional[str], dataclasses.Field]]:
    """(group name or None, field) of every setting, nested groups flattened, in declaration order."""
    for f in dataclasses.fields(cls_or_obj):
        if is_group(f):
            for _, g in leaves(f.default_factory):
                yield f.name, g
        else:
            yield None, f


def as_bool(v) -> bool:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    if isinstance(v, (bool, int)) and v in (0, 1):
        return bool(v)
    raise ValueError(f"not a boolean: {v!r}")


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as field ``f``'s type; ValueError with a message on a value that is not one."""
    m = f.metadata
    if value is None or (m["optional"] and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if m["optional"]:
            return None
        raise ValueError(f"{f.name} needs a value")
    t = m["type"]
    if t is bool:
        try:
            return as_bool(value)
        except ValueError:
            raise ValueError(f"{f.name}={value!r} is not a boolean (true / false)") from None
    if t is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{f.name}={value!r} is not a whole number")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{f.name}={value!r} is not a whole number") from None
    if t is float:
        if isinstance(value, bool):
            raise ValueError(f"{f.name}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{f.name}={value!r} is not a number") from None
    if t is str:
        if not isinstance(value, str):
            raise ValueError(f"{f.name}={value!r} is not a string")
        return value
    return t(value)


def validate(f: dataclasses.Field, value: Any) -> None:
    """ConfigError when ``value`` is outside the field's choices or fails its check."""
    m = f.metadata
    if value is None and m["optional"]:
        return
    if m["choices"] is not None and value not in m["choices"]:
        raise ConfigError(f"{f.name}={value!r} is not supported; choose one of {', '.join(map(str, m['choices']))}")
    if m["check"] is not None:
        problem = m["check"](value)
        if problem:
            raise ConfigError(f"{f.name}={value!r}: {problem}")


def static_part(obj):
    """``obj`` with every traced or host setting at its default (nested groups too): what a
    compiled program depends on."""
    changes = {}
    for f in dataclasses.fields(obj):
        if is_group(f):
            changes[f.name] = static_part(getattr(obj, f.name))
        elif f.metadata["kind"] != "static":
            changes[f.name] = f.default
    return dataclasses.replace(obj, **changes)


# --- checks used by declarations ----------------------------------------------------------------

def at_least(lo) -> Callable:
    return lambda v: None if v >= lo else f"must be at least {lo}"


def positive(v) -> Optional[str]:
    return None if v > 0 else "must be positive"


def non_negative(v) -> Optional[str]:
    return None if v >= 0 else "must be non-negative"


def fraction(v) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else "must lie in [0, 1]"


# --- command line -------------------------------------------------------------------------------

def flag_of(f: dataclasses.Field) -> Optional[str]:
    flag = f.metadata["flag"]
    return ("--" + f.name.replace("_", "-")) if flag is None else (flag or None)


def add_arguments(parser: argparse.ArgumentParser, cls, titles: dict) -> None:
    """One flag per setting of ``cls`` (absent from the namespace unless given), in an argument group
    per settings group; ``titles`` {group name or None: title}. A bool gets ``--x`` and ``--no-x``."""
    groups = {}
    for gname, f in leaves(cls):
        flag = flag_of(f)
        if flag is None:
            continue
        if gname not in groups:
            groups[gname] = parser.add_argument_group(titles.get(gname, gname))
        g, m = groups[gname], f.metadata
        dest = f"setting:{f.name}"
        shown = f" (default {f.default})" if f.default is not None else ""
        if m["type"] is bool:
            g.add_argument(flag, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=m["help"] + shown)
            g.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const=False, default=argparse.SUPPRESS,
                           help=f"turn {flag} off")
        else:
            g.add_argument(flag, dest=dest, type=m["type"], choices=m["choices"], metavar=None if m["choices"] else
                           f.name.split("_")[-1].upper(), default=argparse.SUPPRESS, help=m["help"] + shown)


def given_arguments(args: argparse.Namespace) -> dict:
    """{setting name: value} of the flags :func:`add_arguments` made that were given."""
    return {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("setting:")}
