"""PIE-Bench's annotation format (Ju et al., ICLR 2024): ``mapping_file.json`` items and RLE masks.

``mapping_file.json`` is one JSON object keyed by image id. Each item has ``image_path`` (relative
to the ``annotation_images`` folder), ``original_prompt`` and ``editing_prompt`` (the edited words
in ``[...]``), ``editing_instruction``, ``editing_type_id`` ("0"-"9"), ``blended_word``
("source target", may be empty) and ``mask``: run-length pairs ``(start, length)`` over the
row-major flattened image grid (512 x 512 in PIE-Bench), 1 = the region to edit.

Pure Python / numpy: the dataset reader (:mod:`csg_jax.dataset.manifest`), the evaluator and the
shapes benchmark writer share it, so the format is read and written in one place.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional, Sequence

import numpy as np

from csg_jax.errors import CSGError

EDIT_TYPES = {
    "0": "random editing",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute (content)",
    "5": "change attribute (pose)",
    "6": "change attribute (color)",
    "7": "change attribute (material)",
    "8": "change background",
    "9": "change style",
}
GRID = (512, 512)  # PIE-Bench's image and mask size
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


@dataclasses.dataclass(frozen=True)
class PieItem:
    """One annotated edit. Prompts are given without brackets; the bracketed words are kept apart."""

    id: str
    image_path: str
    source_prompt: str
    target_prompt: str
    source_words: str  # the bracketed words of original_prompt ("" when it has none: an addition)
    target_words: str  # the bracketed words of editing_prompt ("" when it has none: a deletion)
    editing_type_id: str
    editing_instruction: str = ""
    blended_word: tuple[str, ...] = ()  # ("cat", "dog") or ()
    mask: tuple[int, ...] = ()  # RLE (start, length) pairs


def strip_brackets(prompt: str) -> tuple[str, str]:
    """``"a [red] car"`` -> (``"a red car"``, ``"red"``): the prompt without brackets, and the
    bracketed words joined by spaces."""
    words = " ".join(" ".join(m.split()) for m in _BRACKETS.findall(prompt) if m.strip())
    return " ".join(prompt.replace("[", " ").replace("]", " ").split()), words


def parse_item(key: str, rec) -> PieItem:
    """A mapping-file entry -> :class:`PieItem`; CSGError says what is malformed."""
    if not isinstance(rec, dict):
        raise CSGError("expected an object with image_path, original_prompt, editing_prompt, mask")
    problems = []
    for name in ("image_path", "original_prompt", "editing_prompt"):
        if not isinstance(rec.get(name), str) or not rec.get(name).strip():
            problems.append(f"no '{name}' text")
    type_id = rec.get("editing_type_id", "0")
    if isinstance(type_id, int) and not isinstance(type_id, bool):
        type_id = str(type_id)
    if type_id not in EDIT_TYPES:
        problems.append(f"editing_type_id {rec.get('editing_type_id')!r} is not one of '0'..'9'")
    mask = rec.get("mask", [])
    if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and v >= 0 for v in mask):
        problems.append("'mask' must be a list of non-negative integer (start, length) pairs")
    blended = rec.get("blended_word", "") or ""
    if not isinstance(blended, str):
        problems.append("'blended_word' must be a string 'source target'")
    if problems:
        raise CSGError("; ".join(problems))
    src, src_words = strip_brackets(rec["original_prompt"])
    tgt, tgt_words = strip_brackets(rec["editing_prompt"])
    if src == tgt:
        raise CSGError("original_prompt and editing_prompt are the same text: nothing to edit")
    return PieItem(str(key), rec["image_path"].strip(), src, tgt, src_words, tgt_words, type_id,
                   str(rec.get("editing_instruction", "") or ""), tuple(blended.split()), tuple(mask))


def read_mapping(path: str) -> tuple[list[PieItem], list[tuple[str, str]]]:
    """(items in file order, [(key, reason), ...] for malformed entries). CSGError if the file is
    not a JSON object."""
    entries = read_entries(path)
    items = [e for _, e in entries if isinstance(e, PieItem)]
    return items, [(key, e) for key, e in entries if not isinstance(e, PieItem)]


def read_entries(path: str) -> list[tuple[str, "PieItem | str"]]:
    """[(key, PieItem, or the reason it is malformed), ...] in file order (:func:`read_mapping`
    split in two). CSGError if the file is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise CSGError(f"cannot read the PIE-Bench mapping file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CSGError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CSGError(f"{path}: a PIE-Bench mapping file is one JSON object keyed by image id")
    out = []
    for key, rec in data.items():
        try:
            out.append((str(key), parse_item(key, rec)))
        except CSGError as e:
            out.append((str(key), str(e)))
    return out


def is_mapping_file(path: str) -> bool:
    """Whether ``path`` looks like a PIE-Bench mapping file (a .json whose text is one object of
    objects with ``editing_prompt``), as opposed to a JSONL manifest."""
    if not path.lower().endswith(".json"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(isinstance(v, dict) and "editing_prompt" in v for v in data.values())


def decode_mask(rle: Sequence[int], shape: tuple[int, int] = GRID, border: bool = True) -> np.ndarray:
    """RLE ``(start, length)`` pairs -> (H, W) bool, True = edit region. Runs past the end are cut.
    ``border``: set the outermost rows and columns to True, as PIE-Bench's evaluator does (it guards
    against annotation errors at the image edge)."""
    h, w = shape
    flat = np.zeros(h * w, bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[int(start) : min(int(start) + int(length), h * w)] = True
    mask = flat.reshape(h, w)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> RLE ``[start, length, ...]`` over the row-major flattened grid."""
    flat = np.concatenate([[False], np.asarray(mask, bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
          "blended_word", "mask")  # an entry's PIE-Bench fields


def write_mapping(path: str, items: Sequence[PieItem], bracketed: Optional[dict] = None,
                  extra: Optional[dict] = None) -> None:
    """Write ``items`` as a mapping file (atomically). ``bracketed``: {id: (original_prompt,
    editing_prompt)} with brackets; default: each item's prompts with its words bracketed where
    they first occur. ``extra``: {id: {field: JSON value}} written into the entry after PIE-Bench's
    own fields (readers of the format ignore them); a name of :data:`FIELDS` is a CSGError."""
    from csg_jax.io import atomic_write

    out = {}
    for it in items:
        src, tgt = (bracketed or {}).get(it.id) or (_bracket(it.source_prompt, it.source_words),
                                                    _bracket(it.target_prompt, it.target_words))
        out[it.id] = {"image_path": it.image_path, "original_prompt": src, "editing_prompt": tgt,
                      "editing_instruction": it.editing_instruction, "editing_type_id": it.editing_type_id,
                      "blended_word": " ".join(it.blended_word), "mask": list(it.mask)}
        more = (extra or {}).get(it.id, {})
        clash = sorted(set(more) & set(FIELDS))
        if clash:
            raise CSGError(f"item {it.id!r}: extra fields {clash} would replace PIE-Bench's own fields")
        out[it.id].update(more)
    data = (json.dumps(out) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _bracket(prompt: str, words: str) -> str:
    if not words:
        return prompt
    m = re.search(r"(?<!\w)" + re.escape(words) + r"(?!\w)", prompt)
    return prompt if m is None else f"{prompt[: m.start()]}[{m.group(0)}]{prompt[m.end():]}"
