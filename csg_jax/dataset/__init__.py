"""Batched dataset translation over every device of every host: manifests, buckets, batches, resume.

    python -m csg_jax.translate --manifest items.jsonl --out out/ds --batch-size 4
    python -m csg_jax.translate --input-dir photos/ --prompt "a photo of a cat" --task cat2dog --out out/ds

**Items.** A manifest is JSONL (one object per line; blank lines and ``#`` lines are skipped) or
CSV (a header row). Fields: ``image`` (relative to the manifest's folder), ``prompt``, ``task`` or
``target_prompt``, optional ``source_word``, ``id`` (default: the line number; the file stem for
``--input-dir``) and per-item overrides of any :class:`~csg_jax.editing.config.EditConfig` field
but ``dtype`` (``method``, ``num_steps``/``steps``, ``guidance_scale``, ``posterior_guidance``,
``delta``, ``seed``, ``encode``, ...). Ids name output folders and must be unique. A PIE-Bench
``mapping_file.json`` (:func:`~csg_jax.dataset.manifest.read_pie_mapping`, ``--images`` its image
folder) gives one item per entry: its bracketed words locate the edit's token spans, and its
``editing_type_id`` / ``editing_instruction`` / ``blended_word`` go into results.jsonl and meta.json.

**Batches.** Items are grouped into buckets keyed by (static config, VAE sampling on/off, image
size) -- everything that shapes the compiled program -- and cut into global batches of
``batch_size x number of devices``; the last batch of a bucket is padded by repeating its last
item (padding is computed and discarded). One jit-compiled call (encode, invert, edit, decode)
processes a global batch: its inputs live on a one-axis :class:`jax.sharding.Mesh` ``("data",)``
over all devices of all hosts, params replicated, and the body is a ``shard_map`` of
:meth:`~csg_jax.editing.editor.Editor.program`, so every device runs exactly the single-device
program on its rows (no cross-device traffic; results equal the single-image CLI's). Settings
of kind ``image`` and ``host`` (:mod:`csg_jax.editing.schema`: guidance scale, lambda, delta,
seeds, negative prompts, ...) are per item, so items with different values share a batch; ``batch``
settings (the baselines' knobs) are per call (:func:`batch_constants` joins the bucket key: same
program, no recompilation).

**Hosts.** Every host reads the manifest and the results, and builds the same batch list (checked
with a collective); host ``p`` loads, plans and writes only the rows of its own devices
(``jax.make_array_from_process_local_data``). Items that fail before batching (malformed line,
duplicate id, invalid setting, unreadable image) are recorded by host ``index % num_hosts``. So each item is
processed and recorded by exactly one host.

**Modules.** :mod:`~csg_jax.dataset.manifest` (items), :mod:`~csg_jax.dataset.batching`
(buckets, batches), :mod:`~csg_jax.dataset.sharded` (mesh, hosts, the sharded program),
:mod:`~csg_jax.dataset.results` (results log, resume), :mod:`~csg_jax.dataset.run` (the run).

**Outputs and resume.** ``out/<id>/`` gets the single-image CLI's files (atomically, via
:class:`csg_jax.io.StagedDir`); ``out/results.jsonl`` (``results.p<k>.jsonl`` per host when there
are several: appends from several hosts to one file are not atomic on network filesystems) gets
one JSON line per finished item, written with one ``write`` + ``fsync``. A rerun skips items with
an ``ok`` line whose ``meta.json`` exists and retries the rest; a killed run leaves no partial
outputs (staging folders are removed on the next start).
"""

from csg_jax.dataset.batching import Batch, Bucket, batch_constants, plan_batches, plan_digest
from csg_jax.dataset.manifest import (ITEM_FIELDS, Item, check_ids, item_config, read_manifest,
                                      read_pie_mapping, scan_folder)
from csg_jax.dataset.results import RESULTS, ResultsLog, clean_staging, done_ids, read_results
from csg_jax.dataset.run import SPAN_WIDTH, DatasetRun, format_summary
from csg_jax.dataset.sharded import batch_fn, local_rows, make_mesh, maybe_initialize_distributed

__all__ = ["Batch", "Bucket", "batch_constants", "plan_batches", "plan_digest", "ITEM_FIELDS", "Item", "check_ids",
           "item_config", "read_manifest", "read_pie_mapping", "scan_folder", "RESULTS", "ResultsLog", "clean_staging",
           "done_ids", "read_results", "SPAN_WIDTH", "DatasetRun", "format_summary", "batch_fn", "local_rows", "make_mesh",
           "maybe_initialize_distributed"]
