"""Dataset items: JSONL / CSV manifests, PIE-Bench mapping files and image folders -> :class:`Item`;
an item's EditConfig.

Malformed lines, unsafe or repeated ids become items with an ``error`` (recorded, never fatal).
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import os
import re
from typing import Any, Optional, Sequence

from csg_jax.editing.schema import as_bool as schema_bool
from csg_jax.errors import ConfigError, CSGError, PromptError
from csg_jax.io import IMAGE_EXTENSIONS

ITEM_FIELDS = ("id", "image", "prompt", "task", "target_prompt", "source_word", "generate")
PIPELINE_WIDE = ("dtype",)  # fixed by the loaded pipeline: cannot vary per item
_ID_OK = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,199}$")


@dataclasses.dataclass(frozen=True)
class Item:
    """One row of a manifest (or one file of ``--input-dir``)."""

    index: int  # position among the items (0-based)
    line: int  # line number in the manifest (1-based; CSV: the record's first line), 0 for folders
    id: str
    image: Optional[str] = None  # absolute or cwd-relative path
    prompt: Optional[str] = None
    task: Optional[str] = None
    target_prompt: Optional[str] = None
    source_word: Optional[str] = None
    overrides: tuple = ()  # ((EditConfig field, value), ...) sorted
    error: Optional[str] = None  # set when the item cannot be processed at all
    # The edited words of the target prompt when the manifest marks them (PIE-Bench's brackets; ""
    # = none, a deletion); None: found by comparing the prompts. See plans.plan_prompts.
    target_words: Optional[str] = None
    word_hints: tuple = ()  # (source word, target word) to fall back on (PIE-Bench's blended_word)
    extra: tuple = ()  # ((key, value), ...): metadata copied into results.jsonl and meta.json
    generate: bool = False  # no image: sample the source from the item's seed on its prompt, then edit it

    def with_error(self, message: str) -> "Item":
        return dataclasses.replace(self, error=message)


def _clean(v):
    if v is None:
        return None
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return v


def _item_from_record(index: int, line: int, rec: Any, base_dir: str, where: str) -> Item:
    from csg_jax.editing.config import EditConfig

    default_id = str(line)
    if not isinstance(rec, dict):
        return Item(index, line, default_id, error=f"{where}: expected an object with image, prompt and task fields")
    rec = {str(k).strip().replace("-", "_"): _clean(v) for k, v in rec.items() if k is not None}
    rec = {k: v for k, v in rec.items() if v is not None}
    item_id = str(rec.get("id", default_id))
    image = rec.get("image")
    fields = dict(index=index, line=line, id=item_id, prompt=rec.get("prompt"), task=rec.get("task"),
                  target_prompt=rec.get("target_prompt"), source_word=rec.get("source_word"))
    if image is not None:
        image = os.path.expanduser(str(image))
        fields["image"] = image if os.path.isabs(image) else os.path.join(base_dir, image)
    overrides = {}
    for k, v in rec.items():
        if k in ITEM_FIELDS:
            continue
        overrides[EditConfig.canonical_name(k)] = v
    fields["overrides"] = tuple(sorted(overrides.items()))
    problems = []
    try:
        fields["generate"] = schema_bool(rec.get("generate", False))
    except ValueError:
        problems.append(f"'generate' must be true or false, got {rec.get('generate')!r}")
    item = Item(**fields)
    if item.generate and image is not None:
        problems.append("give 'image' or 'generate': true, not both")
    elif image is None and not item.generate and not problems:
        problems.append("no 'image' (or 'generate': true to edit a generated image)")
    if not item.prompt:
        problems.append("no 'prompt'")
    if (item.task is None) == (item.target_prompt is None):
        problems.append("give exactly one of 'task' and 'target_prompt'")
    for k in ("prompt", "task", "target_prompt", "source_word"):
        v = getattr(item, k)
        if v is not None and not isinstance(v, str):
            problems.append(f"'{k}' must be a string")
    if problems:
        return item.with_error(f"{where}: " + "; ".join(problems))
    return item


def read_manifest(path: str, images: Optional[str] = None) -> list[Item]:
    """Items of a JSONL or CSV manifest, or of a PIE-Bench ``mapping_file.json`` (``images``: its
    image folder, see :func:`read_pie_mapping`); malformed lines / entries become items with an
    ``error``."""
    from csg_jax import pie_bench

    if pie_bench.is_mapping_file(path):
        return read_pie_mapping(path, images)
    if images is not None:
        raise CSGError(f"--images is for PIE-Bench mapping files; {path} is not one (image paths in a "
                       "JSONL / CSV manifest are relative to its folder)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CSGError(f"cannot read the manifest {path}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    ext = os.path.splitext(path)[1].lower()
    first = text.lstrip()[:1]
    is_jsonl = ext in (".jsonl", ".json", ".ndjson") or (ext != ".csv" and first in ("{", "#"))
    items: list[Item] = []
    name = os.path.basename(path)
    if is_jsonl:
        for line_no, raw in enumerate(text.split("\n"), start=1):
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            where = f"{name} line {line_no}"
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                items.append(Item(len(items), line_no, str(line_no), error=f"{where}: malformed JSON ({e.msg})"))
                continue
            items.append(_item_from_record(len(items), line_no, rec, base, where))
    else:
        reader = csv.reader(_io.StringIO(text))
        header = None
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                items.append(Item(len(items), start, str(start), error=f"{name} line {start}: {e}"))
                continue
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                continue
            where = f"{name} line {start}"
            if len(row) > len(header):
                message = f"{where}: {len(row)} cells but {len(header)} header columns"
                items.append(Item(len(items), start, str(start), error=message))
                continue
            items.append(_item_from_record(len(items), start, dict(zip(header, row)), base, where))
        if header is None:
            raise CSGError(f"the CSV manifest {path} has no header row (image,prompt,task,...)")
    return check_ids(items)


def read_pie_mapping(path: str, images: Optional[str] = None) -> list[Item]:
    """One item per entry of a PIE-Bench mapping file (:mod:`csg_jax.pie_bench`), in file order: id =
    key, image = ``images`` / image_path (default: ``<mapping folder>/annotation_images`` if it
    exists, else the mapping file's folder), prompt / target_prompt without brackets, the bracketed
    words as source_word / target_words, blended_word as word hints, PIE's labels in ``extra``."""
    from csg_jax import pie_bench

    base = os.path.dirname(os.path.abspath(path))
    if images is None:
        images = os.path.join(base, "annotation_images")
        images = images if os.path.isdir(images) else base
    elif not os.path.isdir(images):
        raise CSGError(f"--images {images} is not a folder (it holds PIE-Bench's annotation_images)")
    name = os.path.basename(path)
    items = []
    for index, (key, entry) in enumerate(pie_bench.read_entries(path)):
        if isinstance(entry, str):
            items.append(Item(index, 0, key, error=f"{name} entry {key!r}: {entry}"))
            continue
        extra = (("editing_type_id", entry.editing_type_id), ("editing_instruction", entry.editing_instruction),
                 ("blended_word", " ".join(entry.blended_word)))
        items.append(Item(index, 0, key, os.path.join(images, entry.image_path), entry.source_prompt,
                          target_prompt=entry.target_prompt, source_word=entry.source_words or None,
                          target_words=entry.target_words, word_hints=entry.blended_word, extra=extra))
    return check_ids(items)


def scan_folder(folder: str, prompt: Optional[str], task: Optional[str] = None,
                target_prompt: Optional[str] = None, source_word: Optional[str] = None) -> list[Item]:
    """One item per image file of ``folder`` (sorted by name), id = file stem."""
    if not os.path.isdir(folder):
        raise CSGError(f"--input-dir {folder} is not a folder")
    if not prompt:
        raise PromptError("--input-dir needs --prompt (the source prompt shared by every image)")
    if (task is None) == (target_prompt is None):
        raise PromptError("--input-dir needs --task (e.g. cat2dog) or --target-prompt")
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    items = [Item(i, 0, os.path.splitext(n)[0], os.path.join(folder, n), prompt, task, target_prompt, source_word)
             for i, n in enumerate(names)]
    return check_ids(items)


def check_ids(items: Sequence[Item]) -> list[Item]:
    """Unsafe ids and repeated ids (every occurrence after the first) become errors."""
    seen: dict[str, Item] = {}
    out = []
    for it in items:
        if it.error is None and not _ID_OK.match(it.id):
            it = it.with_error(f"id {it.id!r} cannot name a folder (no '/', no leading '.', at most 200 characters)")
        elif it.error is None and (it.id == "summary.json" or re.fullmatch(r"results(\.p\d+)?\.jsonl", it.id)):
            it = it.with_error(f"id {it.id!r} is the name of a file the run writes; choose another id")
        elif it.id in seen:
            first = seen[it.id]
            where = f"line {first.line}" if first.line else first.image
            it = it.with_error(f"duplicate id {it.id!r} (first used by {where}); ids must be unique")
        seen.setdefault(it.id, it)
        out.append(it)
    return out


def item_config(base, item: Item):
    """The item's EditConfig: ``base`` with the item's overrides, each coerced to its declared type
    (a CSV's ``0.5``, ``false``, ``10`` arrive as strings); ConfigError names the setting."""
    from csg_jax.editing.config import EditConfig

    for k, _ in item.overrides:
        if k in PIPELINE_WIDE:
            raise ConfigError(f"'{k}' is fixed for the whole run (one loaded model); set it on the command line")
    try:
        changes = EditConfig.from_dict(dict(item.overrides), source="item").to_dict()
    except ConfigError as e:
        raise ConfigError(f"{e}; item fields: {', '.join(ITEM_FIELDS)}") from None
    given = {k for k, _ in item.overrides}
    return base.replace(**{k: v for k, v in changes.items() if k in given})
