"""Batched dataset translation over every device of every host: manifests, buckets, batches, resume.

    python -m csg_jax.translate --manifest items.jsonl --out out/ds --batch-size 4
    python -m csg_jax.translate --input-dir photos/ --prompt "a photo of a cat" --task cat2dog --out out/ds

**Items.** A manifest is JSONL (one object per line; blank lines and ``#`` lines are skipped) or
CSV (a header row). Fields: ``image`` (relative to the manifest's folder), ``prompt``, ``task`` or
``target_prompt``, optional ``source_word``, ``id`` (default: the line number; the file stem for
``--input-dir``) and per-item overrides of any :class:`~csg_jax.editing.config.EditConfig` field
but ``dtype`` (``method``, ``num_steps``/``steps``, ``guidance_scale``, ``posterior_guidance``,
``delta``, ``seed``, ``encode``, ...). Ids name output folders and must be unique.

**Batches.** Items are grouped into buckets keyed by (static config, VAE sampling on/off, image
size) -- everything that shapes the compiled program -- and cut into global batches of
``batch_size x number of devices``; the last batch of a bucket is padded by repeating its last
item (padding is computed and discarded). One jit-compiled call (encode, invert, edit, decode)
processes a global batch: its inputs live on a one-axis :class:`jax.sharding.Mesh` ``("data",)``
over all devices of all hosts, params replicated, and the body is a ``shard_map`` of the
:class:`~csg_jax.editing.editor.Editor` functions, so every device runs exactly the single-device
program on its rows (no cross-device traffic; results equal the single-image CLI's). Float knobs
(guidance scale, lambda, delta), seeds and negative prompts are per item, so items with different
values share a batch; the baselines' own knobs (P2P, Pix2Pix-Zero) are per batch
(:func:`batch_constants` joins the bucket key: same program, no recompilation).

**Hosts.** Every host reads the manifest and the results, and builds the same batch list (checked
with a collective); host ``p`` loads, plans and writes only the rows of its own devices
(``jax.make_array_from_process_local_data``). Items that fail before batching (malformed line,
duplicate id, invalid setting, unreadable image) are recorded by host ``index % num_hosts``. So each item is
processed and recorded by exactly one host.

**Outputs and resume.** ``out/<id>/`` gets the single-image CLI's files (atomically, via
:class:`csg_jax.io.StagedDir`); ``out/results.jsonl`` (``results.p<k>.jsonl`` per host when there
are several: appends from several hosts to one file are not atomic on network filesystems) gets
one JSON line per finished item, written with one ``write`` + ``fsync``. A rerun skips items with
an ``ok`` line whose ``meta.json`` exists and retries the rest; a killed run leaves no partial
outputs (staging folders are removed on the next start).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from csg_jax.errors import ConfigError, CSGError, PromptError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
ITEM_FIELDS = ("id", "image", "prompt", "task", "target_prompt", "source_word")
OVERRIDE_ALIASES = {"steps": "num_steps", "negative": "negative_prompt", "inversion_variant": "inversion"}
OVERRIDE_TYPES = {"num_steps": int, "guidance_scale": float, "posterior_guidance": float, "delta": float,
                  "seed": int, "mask_res": int}
PIPELINE_WIDE = ("dtype",)  # fixed by the loaded pipeline: cannot vary per item
SPAN_WIDTH = 8  # token columns of the source word per item (fixed so that all hosts agree on shapes)
RESULTS = "results.jsonl"
_ID_OK = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]{0,199}$")


# --- items ----------------------------------------------------------------------------------------

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
        overrides[OVERRIDE_ALIASES.get(k, k)] = v
    fields["overrides"] = tuple(sorted(overrides.items()))
    item = Item(**fields)
    problems = []
    if image is None:
        problems.append("no 'image'")
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


def read_manifest(path: str) -> list[Item]:
    """Items of a JSONL or CSV manifest; malformed lines become items with an ``error``."""
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
        import io as _io

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
    """The item's EditConfig: ``base`` with the item's overrides (ConfigError names the item)."""
    changes = {}
    known = {f.name for f in dataclasses.fields(base)}
    for k, v in item.overrides:
        if k in PIPELINE_WIDE:
            raise ConfigError(f"'{k}' is fixed for the whole run (one loaded model); set it on the command line")
        if k not in known:
            raise ConfigError(f"unknown field {k!r}; item fields: {', '.join(ITEM_FIELDS)}; "
                              f"overrides: {', '.join(sorted(known - set(PIPELINE_WIDE)))}")
        try:
            changes[k] = OVERRIDE_TYPES[k](v) if k in OVERRIDE_TYPES else v
        except (TypeError, ValueError):
            raise ConfigError(f"{k}={v!r} is not a number") from None
    return base.replace(**changes)


# --- results and resume -------------------------------------------------------------------------------

def results_path(out: str, process_index: int = 0, process_count: int = 1) -> str:
    return os.path.join(out, RESULTS if process_count == 1 else f"results.p{process_index}.jsonl")


def read_results(out: str) -> list[dict]:
    """All result records of ``out`` (every host's file), in file order; torn lines are skipped."""
    records = []
    for path in sorted(set(glob.glob(os.path.join(out, "results.jsonl")) + glob.glob(os.path.join(out, "results.p*.jsonl")))):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    records.append(rec)
    return records


def done_ids(out: str, records: Optional[list[dict]] = None) -> set:
    """Ids finished earlier: an ``ok`` record and ``out/<id>/meta.json`` on disk."""
    records = read_results(out) if records is None else records
    return {r["id"] for r in records if r.get("status") == "ok"
            and os.path.isfile(os.path.join(out, str(r["id"]), "meta.json"))}


class ResultsLog:
    """Append-only JSONL: one ``os.write`` of a whole line per record, then fsync."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size:  # a torn last line (power loss) must not swallow the next record
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, record: dict) -> None:
        data = (json.dumps(record, default=_json_default) + "\n").encode()
        os.write(self.fd, data)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def clean_staging(out: str) -> int:
    """Remove staging folders a killed run left (``.<id>.partial-*``, ``<id>.old-<pid>``)."""
    import shutil

    n = 0
    for path in glob.glob(os.path.join(out, ".*.partial-*")) + glob.glob(os.path.join(out, "*.old-[0-9]*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


# --- buckets and batches ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bucket:
    """What shapes the compiled program: static config, VAE sampling, image size (H, W)."""

    config: Any  # editor.static_config(...)
    sample: bool
    hw: tuple[int, int]
    constants: tuple = ()  # settings one batch shares (baselines' knobs): ((name, value), ...)

    def label(self) -> str:
        c = self.config
        return f"{self.hw[0]}x{self.hw[1]} {c.method} {c.num_steps} steps" + (" sample" if self.sample else "")


@dataclasses.dataclass
class Batch:
    bucket: Bucket
    items: list  # [(Item, EditConfig)], 1..global_batch real items
    number: int = 0

    def slots(self, size: int) -> list:
        """``size`` slots: the items, then the last item repeated (padding)."""
        return self.items + [self.items[-1]] * (size - len(self.items))


PER_ITEM = ("guidance_scale", "posterior_guidance", "delta", "seed", "negative_prompt", "encode")


def batch_constants(config) -> tuple:
    """Settings outside the static config that one compiled call takes as scalars, so items that
    differ in them go to different buckets (same program, no recompilation): the baselines' knobs
    (:func:`csg_jax.editing.editor.method_knobs`), and the seed under noise regularisation."""
    from csg_jax.editing.editor import static_config

    static = static_config(config)
    out = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                if f.name not in PER_ITEM and getattr(config, f.name) != getattr(static, f.name))
    if getattr(config, "noise_regularization", False):
        out += (("seed", config.seed),)
    return out


def plan_batches(entries: Iterable[tuple[Item, Any, tuple[int, int]]], global_batch: int) -> list[Batch]:
    """Group (item, config, image size) into buckets (in order of first appearance) and cut them
    into batches of at most ``global_batch`` items (manifest order inside a bucket)."""
    from csg_jax.editing.editor import static_config

    buckets: dict[Bucket, list] = {}
    for item, config, hw in entries:
        key = Bucket(static_config(config), config.encode == "sample", tuple(hw), batch_constants(config))
        buckets.setdefault(key, []).append((item, config))
    batches = []
    for key, members in buckets.items():
        for i in range(0, len(members), global_batch):
            batches.append(Batch(key, members[i : i + global_batch], len(batches)))
    return batches


def plan_digest(batches: Sequence[Batch], errors: Sequence[Item]) -> np.ndarray:
    """A fingerprint of the batch plan, so hosts can check that they agree."""
    h = hashlib.sha256()
    for b in batches:
        h.update(repr((b.bucket.label(), [it.id for it, _ in b.items])).encode())
    h.update(repr([it.index for it in errors]).encode())
    return np.frombuffer(h.digest()[:16], np.int32).copy()


# --- devices ---------------------------------------------------------------------------------------

def maybe_initialize_distributed(flag: bool) -> bool:
    """``jax.distributed.initialize()`` when asked (``--distributed``) or when JAX_COORDINATOR_ADDRESS is set.

    Cloud TPU pods, SLURM, Open MPI and Kubernetes are auto-detected by JAX; elsewhere set
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before
    anything touches a JAX device. CPU runs use gloo collectives (JAX's default).
    """
    env = os.environ
    if not flag and not env.get("JAX_COORDINATOR_ADDRESS"):
        return False
    import jax

    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    return True


def make_mesh(devices=None):
    """A one-axis ``("data",)`` mesh over all devices, each host's devices contiguous."""
    import jax
    from jax.sharding import Mesh

    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def local_rows(sharding, global_batch: int) -> tuple[int, int]:
    """[lo, hi) rows of a global batch held by this host's devices (contiguous by construction)."""
    idx = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch) for s in idx.values())
    lo, hi = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != hi - lo:
        raise RuntimeError("this host's devices do not hold a contiguous block of the batch")
    return lo, hi


def _to_global(x: np.ndarray, sharding, global_shape):
    import jax

    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x, global_shape)


def _local_rows_of(arr) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order."""
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # (replicas of a row block on several local devices: take one)
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


_BATCH_FNS: dict = {}


def encode_items(encode, params, images, keys):
    """VAE posterior samples with one PRNG key per image: (B, H, W, 3), (B, 2) -> (B, h, w, C).

    Image i gets exactly the noise ``encode(params, images[i:i+1], keys[i])`` draws for it alone
    (the single-image CLI with that item's seed), whatever the batch around it."""
    import jax

    return jax.vmap(lambda im, k: encode(params, im[None], k)[0])(images, keys)


def batch_fn(editor, mesh, sample: bool):
    """jit(shard_map(encode -> invert -> edit -> decode)) over ``mesh``'s "data" axis.

    ``f(params, images (G, H, W, 3), keys (G, 2) | None, prompts (G, ...), knobs (G,), method_knobs
    (scalars) | None, rng (2,) | None)`` -> dict of (G, ...) arrays: inverted, reconstruction, edited,
    mask_raw, mask (latent size), reconstruction_image, edit_image (decoded, [-1, 1]), and for
    null-text inversion null_embeddings, null_text_iterations. Each device runs the single-device
    :class:`~csg_jax.editing.editor.Editor` program on its rows (``method_knobs`` and ``rng``, the
    noise-regularisation key, are replicated).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    key = (id(editor), sample, tuple(d.id for d in mesh.devices.flat))
    if key in _BATCH_FNS:
        return _BATCH_FNS[key][1]

    def local(params, images, keys, prompts, knobs, method_knobs, rng):
        if sample:
            x0 = encode_items(editor._encode_impl, params, images, keys)
        else:
            x0 = editor._encode_impl(params, images, None)
        extra, uncond = {}, None
        if editor.config.inversion == "null-text":
            nt = editor._null_text_impl(params, x0, prompts, knobs, rng)
            x_T, uncond = nt.x_T, nt.uncond
            extra = {"null_embeddings": jnp.moveaxis(nt.uncond, 1, 0), "null_text_iterations": nt.iterations.T}
        else:
            x_T = editor._invert_impl(params, x0, prompts.source, rng)
        out = dict(editor._edit_impl(params, x_T, prompts, knobs, method_knobs, uncond))
        b = images.shape[0]
        decoded = editor._decode_impl(params, jnp.concatenate([out["reconstruction"], out["edited"]]))
        return {"inverted": x_T, **out, **extra, "reconstruction_image": decoded[:b], "edit_image": decoded[b:]}

    data = P("data")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), data, data, data, data, P(), P()), out_specs=data,
                               check_vma=False))
    _BATCH_FNS[key] = (editor, fn)  # (keeps the editor alive so its id stays unique)
    return fn


# --- the run -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    """One item, ready for the device: image, prompt plan, config, timings."""

    item: Item
    config: Any
    image: np.ndarray  # (H, W, 3) float32 in [-1, 1]
    source_unit: np.ndarray  # (H, W, 3) in [0, 1] (the grid's source panel)
    notices: list
    plan: Any  # PromptPlan
    prompts: Any  # csg.Prompts of this item alone, numpy, source columns padded to SPAN_WIDTH
    key: np.ndarray  # (2,) uint32 PRNG key from the item's seed
    load_s: float


def _pad_span(cols, wts, width: int, what: str):
    cols, wts = np.asarray(cols), np.asarray(wts)
    k = cols.shape[1]
    if k > width:
        raise PromptError(f"the {what} spans {k} tokens; dataset mode handles at most {width}")
    cols = np.concatenate([cols, np.repeat(cols[:, :1], width - k, axis=1)], axis=1)  # as batch_prompts pads
    wts = np.concatenate([wts, np.zeros((wts.shape[0], width - k), wts.dtype)], axis=1)
    return cols.astype(np.int32), wts.astype(np.float32)


def _pad_columns(prompts, width: int):
    """Numpy prompts with the token spans padded to ``width`` columns (equal shapes on every host)."""
    import jax

    p = jax.tree.map(np.asarray, prompts)
    cols, wts = _pad_span(p.source_columns, p.source_weights, width, "source word")
    p = p._replace(source_columns=cols, source_weights=wts)
    if getattr(p, "target_columns", None) is not None:
        cols, wts = _pad_span(p.target_columns, p.target_weights, width, "target text")
        p = p._replace(target_columns=cols, target_weights=wts)
    return p


def _dummy(pipe, bucket: Bucket, config) -> Prepared:
    """A placeholder row (zeros image, empty prompts) for slots whose host holds no valid item."""
    from csg_jax.editing.editor import PromptPlan, batch_prompts

    n = pipe.max_length
    plan = PromptPlan("", "", "", "", "", (1, 2), (1, 2), tuple(range(n)))
    h, w = bucket.hw
    return Prepared(Item(-1, 0, "<padding>"), config, np.zeros((h, w, 3), np.float32), np.zeros((h, w, 3), np.float32),
                    [], plan, _pad_columns(batch_prompts(pipe, [plan]), SPAN_WIDTH), np.zeros(2, np.uint32), 0.0)


class DatasetRun:
    """Translates a list of items into ``out``; see the module docstring. Call :meth:`run`."""

    def __init__(self, pipe, items: Sequence[Item], base_config, out: str, *, batch_size: int = 1,
                 size: Optional[int] = None, save_inversion: bool = False, save_latents: bool = False,
                 quiet: bool = False, model_info: Optional[dict] = None, load_s: float = 0.0, log=None):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from csg_jax.editing.editor import image_multiple

        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        self.pipe, self.items, self.base_config = pipe, list(items), base_config
        self.out = os.path.abspath(out)
        self.batch_size, self.save_inversion, self.save_latents = batch_size, save_inversion, save_latents
        self.multiple = image_multiple(pipe)
        native = pipe.unet.config.sample_size * pipe.downsample
        self.size = size or native
        self.model_info, self.load_s = model_info or {}, load_s
        self.nproc, self.pidx = jax.process_count(), jax.process_index()
        self.quiet = quiet  # no progress bar (only process 0 has one anyway) and no per-item error lines
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.mesh = make_mesh()
        self.global_batch = batch_size * self.mesh.size
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.lo, self.hi = local_rows(self.data_sharding, self.global_batch)
        self.counts = {"ok": 0, "failed": 0}

    # -- planning -----------------------------------------------------------------------------------
    def plan(self) -> tuple[list[Batch], list[Item], int]:
        """(batches, items failing before batching, number of items skipped as done)."""
        done = done_ids(self.out) if os.path.isdir(self.out) else set()
        entries, errors, skipped = [], [], 0
        for it in self.items:
            if it.error is None and it.id in done:
                skipped += 1
                continue
            if it.error is not None:
                errors.append(it)
                continue
            try:
                config = item_config(self.base_config, it)
                hw = _fitted_size_cached(it.image, self.size, self.multiple)
            except CSGError as e:
                errors.append(it.with_error(str(e)))
                continue
            entries.append((it, config, hw))
        return plan_batches(entries, self.global_batch), errors, skipped

    # -- per host --------------------------------------------------------------------------------------
    def _prepare_item(self, item: Item, config) -> Prepared:
        from csg_jax import io
        from csg_jax.editing.editor import batch_prompts, plan_prompts, to_model_range, to_unit_range

        import jax

        t0 = time.perf_counter()
        image, notices = io.load_image(item.image, self.size, self.multiple)
        x = to_model_range(image)
        plan = plan_prompts(self.pipe, item.prompt, item.task, item.target_prompt, item.source_word,
                            config.negative_prompt)
        prompts = batch_prompts(self.pipe, [plan], config.equalizer_words, config.token_alignment)
        if config.method == "pix2pix-zero":
            from csg_jax.editing import pix2pix_zero

            prompts = pix2pix_zero.edit_context(self.pipe, prompts, config)
        prompts = _pad_columns(prompts, SPAN_WIDTH)
        key = np.asarray(jax.random.PRNGKey(config.seed), np.uint32)
        return Prepared(item, config, x, to_unit_range(x), notices, plan, prompts, key, time.perf_counter() - t0)

    def _prepare(self, batch: Batch):
        """Load and plan this host's rows of ``batch``; returns (device inputs, rows, errors)."""
        import jax

        from csg_jax.editing import csg
        from csg_jax.editing.editor import method_knobs as method_knobs_of

        slots = batch.slots(self.global_batch)
        n_real = len(batch.items)
        rows: list[Optional[Prepared]] = []
        errors: list[tuple[Item, str]] = []
        cache: dict[int, Any] = {}
        for r in range(self.lo, self.hi):
            item, config = slots[r]
            if item.index not in cache:
                try:
                    cache[item.index] = self._prepare_item(item, config)
                except CSGError as e:
                    cache[item.index] = str(e)
                except Exception as e:  # an odd file must not stop the run
                    cache[item.index] = f"{type(e).__name__}: {e}"
                if isinstance(cache[item.index], str) and r < n_real:
                    errors.append((item, cache[item.index]))
            p = cache[item.index]
            rows.append(p if isinstance(p, Prepared) else None)
        valid = [p for p in rows if p is not None]
        filler = valid[-1] if valid else _dummy(self.pipe, batch.bucket, slots[-1][1])
        filled = [p if p is not None else filler for p in rows]
        stack = lambda xs: np.stack(xs)
        prompts = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.prompts for p in filled])
        knobs = csg.Knobs.stack([p.config for p in filled])
        images = stack([p.image for p in filled])
        keys = stack([p.key for p in filled]) if batch.bucket.sample else None
        g = self.global_batch
        put = lambda x: _to_global(x, self.data_sharding, (g, *x.shape[1:]))
        config = batch.items[0][1]  # (batch constants are equal across the batch)
        replicate = lambda x: _to_global(np.asarray(x), self.replicated, np.shape(x))
        method_knobs = jax.tree.map(replicate, method_knobs_of(config))
        rng = replicate(np.asarray(jax.random.PRNGKey(config.seed), np.uint32)) \
            if getattr(config, "noise_regularization", False) else None
        inputs = (put(images), None if keys is None else put(keys), jax.tree.map(put, prompts), jax.tree.map(put, knobs),
                  method_knobs, rng)
        owned = [(r, p) for r, p in zip(range(self.lo, self.hi), rows) if r < n_real and p is not None]
        return inputs, owned, errors

    def _finish(self, batch: Batch, outputs, owned, t_dispatch: float, results: ResultsLog):
        from csg_jax.editing.editor import EditResult, get_editor, to_unit_range
        from csg_jax.translate import write_item_outputs

        try:
            local = {k: _local_rows_of(v) for k, v in outputs.items()}
        except Exception as e:  # the batch failed on the device: every item of ours in it failed
            for _, p in owned:
                self._record_error(results, p.item, f"batch {batch.number} failed: {type(e).__name__}: {e}")
            return
        batch_s = time.perf_counter() - t_dispatch
        per_image_s = batch_s / len(batch.items)
        batch_editor = get_editor(self.pipe, batch.items[0][1], tuple(s // self.pipe.downsample for s in batch.bucket.hw))
        for r, p in owned:
            i = r - self.lo
            t0 = time.perf_counter()
            timings = {"load_image_and_prompts": p.load_s, "batch": batch_s, "per_image": per_image_s}
            result = EditResult(
                plan=p.plan, inverted=local["inverted"][i], reconstruction_latent=local["reconstruction"][i],
                edited_latent=local["edited"][i], mask_raw=local["mask_raw"][i], mask=local["mask"][i],
                source_image=p.source_unit, reconstruction=to_unit_range(local["reconstruction_image"][i]),
                edit=to_unit_range(local["edit_image"][i]), timings=timings,
                unet_evaluations=batch_editor.unet_evaluations(self.batch_size),
                **{k: local[k][i] for k in ("null_embeddings", "null_text_iterations") if k in local})
            try:
                paths = write_item_outputs(
                    os.path.join(self.out, p.item.id), result, p.config, model_info=self.model_info,
                    image_info={"path": p.item.image, "demo": False, "notices": p.notices, "inversion_file": None,
                                "size": list(batch.bucket.hw)},
                    timings={"load_model": self.load_s, **timings}, save_inversion=self.save_inversion,
                    save_latents=self.save_latents,
                    extra_meta={"dataset": {"id": p.item.id, "line": p.item.line, "index": p.item.index,
                                            "batch": batch.number, "bucket": batch.bucket.label(),
                                            "global_batch": self.global_batch, "devices": self.mesh.size}})
            except Exception as e:
                self._record_error(results, p.item, f"cannot write outputs: {type(e).__name__}: {e}")
                continue
            timings["write"] = time.perf_counter() - t0
            results.append({"id": p.item.id, "status": "ok", "line": p.item.line, "image": p.item.image, "batch": batch.number,
                            "bucket": batch.bucket.label(), "process": self.pidx, "timings_s": timings,
                            "out": os.path.join(self.out, p.item.id), "paths": paths,
                            "warnings": list(p.plan.warnings), "error": None})
            self.counts["ok"] += 1

    def _record_error(self, results: ResultsLog, item: Item, message: str):
        results.append({"id": item.id, "status": "error", "line": item.line, "process": self.pidx,
                        "image": item.image, "timings_s": {}, "paths": {}, "error": message})
        self.counts["failed"] += 1
        if not self.quiet:
            self.log(f"error: item {item.id}: {message}")

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        import jax
        from jax.experimental import multihost_utils
        from tqdm import tqdm

        from csg_jax.editing.editor import get_editor

        os.makedirs(self.out, exist_ok=True)
        lock = _lock(self.out) if self.pidx == 0 else None
        if self.pidx == 0:
            clean_staging(self.out)
        if self.nproc > 1:
            multihost_utils.sync_global_devices("csg_jax.dataset: staging cleaned")
        batches, pre_errors, skipped = self.plan()
        if self.nproc > 1:
            multihost_utils.assert_equal(plan_digest(batches, pre_errors),
                                         "hosts disagree on the dataset plan: do they see the same manifest, "
                                         "images and output folder (a shared filesystem)?")
            multihost_utils.sync_global_devices("csg_jax.dataset: planned")  # nobody appends before all have read
        results = ResultsLog(results_path(self.out, self.pidx, self.nproc))
        for it in pre_errors:
            if it.index % self.nproc == self.pidx:
                self._record_error(results, it, it.error)
        params = jax.device_put(self.pipe.params, self.replicated) if self.nproc == 1 else jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.replicated, np.asarray(a)), self.pipe.params)
        total = sum(len(b.items) for b in batches)
        bar = tqdm(total=total, disable=self.quiet or self.pidx != 0, unit="img", desc=f"translate x{self.mesh.size} devices",
                   smoothing=0.1, dynamic_ncols=True)
        t_start = time.perf_counter()
        batch_times = []
        pending = None
        try:
            for batch in batches:
                try:
                    latent_hw = tuple(s // self.pipe.downsample for s in batch.bucket.hw)
                    fn = batch_fn(get_editor(self.pipe, batch.items[0][1], latent_hw), self.mesh, batch.bucket.sample)
                    inputs, owned, errors = self._prepare(batch)
                except Exception as e:  # the bucket's settings are unusable (e.g. mask_res), or out of host memory
                    inputs, errors = None, []
                    owned = [(r, _Stub(it)) for r, (it, _) in enumerate(batch.items) if self.lo <= r < self.hi]
                    outputs = _Failed(e)
                for item, msg in errors:
                    self._record_error(results, item, msg)
                t_dispatch = time.perf_counter()
                if inputs is not None:
                    try:
                        outputs = fn(params, *inputs)  # asynchronous: the host goes on while devices work
                    except Exception as e:
                        outputs = _Failed(e)
                if pending is not None:
                    self._complete(pending, results, bar, batch_times)
                pending = (batch, outputs, owned, t_dispatch)
            if pending is not None:
                self._complete(pending, results, bar, batch_times)
        finally:
            bar.close()
            results.close()
        wall = time.perf_counter() - t_start
        counts = np.array([self.counts["ok"], self.counts["failed"]], np.int64)
        if self.nproc > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(self.nproc, 2).sum(0)
        summary = {"ok": int(counts[0]), "failed": int(counts[1]), "skipped": skipped, "items": len(self.items),
                   "batches": len(batches), "buckets": len({b.bucket for b in batches}), "wall_s": wall,
                   "images_per_s": float(counts[0]) / wall if wall > 0 else 0.0,
                   "steady_images_per_s": _steady_rate(batch_times), "devices": self.mesh.size,
                   "processes": self.nproc, "batch_size_per_device": self.batch_size,
                   "global_batch": self.global_batch, "out": self.out}
        if self.pidx == 0:
            from csg_jax import io

            io.save_json(os.path.join(self.out, "summary.json"), summary)
        if lock is not None:
            lock.close()
        return summary

    def _complete(self, pending, results, bar, batch_times):
        batch, outputs, owned, t_dispatch = pending
        if isinstance(outputs, _Failed):
            for _, p in owned:
                self._record_error(results, p.item, f"batch {batch.number} failed: {outputs}")
        else:
            self._finish(batch, outputs, owned, t_dispatch, results)
        batch_times.append((len(batch.items), time.perf_counter()))
        bar.update(len(batch.items))
        bar.set_postfix(ok=self.counts["ok"], failed=self.counts["failed"], refresh=False)


class _Stub:
    def __init__(self, item: Item):
        self.item = item


class _Failed:
    def __init__(self, e: Exception):
        self.e = e

    def __str__(self):
        return f"{type(self.e).__name__}: {self.e}"


def _steady_rate(batch_times) -> Optional[float]:
    """Images/s after the first batch (which includes compilation)."""
    if len(batch_times) < 2:
        return None
    n = sum(k for k, _ in batch_times[1:])
    dt = batch_times[-1][1] - batch_times[0][1]
    return n / dt if dt > 0 else None


_SIZES: dict = {}


def _fitted_size_cached(path: str, size: int, multiple: int) -> tuple[int, int]:
    from csg_jax import io

    key = (path, size, multiple)
    if key not in _SIZES:
        _SIZES[key] = io.fitted_size(path, size, multiple)
    return _SIZES[key]


class _Lock:
    def __init__(self, f):
        self.f = f

    def close(self):
        self.f.close()


def _lock(out: str):
    """An exclusive lock on ``out/.lock`` for the run (one writer per output folder)."""
    f = open(os.path.join(out, ".lock"), "a")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        pass
    except OSError:
        f.close()
        raise CSGError(f"another run is writing to {out}; wait for it or choose another --out") from None
    return _Lock(f)


# --- CLI -------------------------------------------------------------------------------------------

def format_summary(s: dict) -> str:
    rate = f"{s['images_per_s']:.3f}"
    steady = s.get("steady_images_per_s")
    lines = [
        f"dataset run -> {s['out']}",
        f"  {'ok':<10}{s['ok']:>8}",
        f"  {'failed':<10}{s['failed']:>8}",
        f"  {'skipped':<10}{s['skipped']:>8}   (done in an earlier run)",
        f"  {'images/s':<10}{rate:>8}   ({s['ok']} in {s['wall_s']:.1f} s incl. compilation"
        + (f"; {steady:.3f} after the first batch" if steady else "") + ")",
        f"  {'devices':<10}{s['devices']:>8}   ({s['processes']} process(es), batch {s['batch_size_per_device']}/device, "
        f"{s['buckets']} bucket(s), {s['batches']} batch(es))",
    ]
    return "\n".join(lines)


def run_cli(args) -> int:
    """``python -m csg_jax.translate --manifest ... | --input-dir ...``: exit 0 all ok, 3 some failed."""
    distributed = maybe_initialize_distributed(getattr(args, "distributed", False))
    import jax
    import jax.numpy as jnp

    from csg_jax.pipeline import load_pipeline, model_summary
    from csg_jax.translate import edit_config_from_args, resolve_model

    if args.image or args.demo or args.inversion:
        raise CSGError("--manifest / --input-dir replace --image, --demo and --inversion")
    if args.manifest and args.input_dir:
        raise CSGError("give --manifest or --input-dir, not both")
    config = edit_config_from_args(args)
    if args.manifest:
        if args.prompt or args.task or args.target_prompt:
            raise CSGError("with --manifest the prompts come from the manifest; drop --prompt/--task/--target-prompt")
        items = read_manifest(args.manifest)
    else:
        items = scan_folder(args.input_dir, args.prompt, args.task, args.target_prompt, args.source_word)
    t0 = time.perf_counter()
    model = resolve_model(args.model)
    pipe = load_pipeline(model, dtype=getattr(jnp, config.dtype), param_dtype=getattr(jnp, config.dtype), cache=args.cache)  # bfloat16 layers cast their weights to bfloat16 anyway: keep them so (half the memory, no per-call cast)
    load_s = time.perf_counter() - t0
    run = DatasetRun(pipe, items, config, args.out, batch_size=args.batch_size, size=args.size,
                     save_inversion=args.save_inversion, save_latents=args.save_latents, quiet=args.quiet,
                     model_info={k: v for k, v in model_summary(pipe).items() if k != "unet"}, load_s=load_s)
    summary = run.run()
    if jax.process_index() == 0:
        print(format_summary(summary), flush=True)
    if distributed:
        jax.distributed.shutdown()
    return 0 if summary["failed"] == 0 else 3
