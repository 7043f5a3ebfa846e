"""The results log of a dataset run (one JSON line per finished item) and what resume reads from it.

``out/results.jsonl`` (``results.p<k>.jsonl`` per host when there are several: appends from
several hosts to one file are not atomic on network filesystems); each record is one ``write``
+ ``fsync``. A rerun skips items with an ``ok`` line whose ``meta.json`` exists.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

from csg_jax.errors import CSGError
from csg_jax.io import json_default

RESULTS = "results.jsonl"


def results_path(out: str, process_index: int = 0, process_count: int = 1) -> str:
    return os.path.join(out, RESULTS if process_count == 1 else f"results.p{process_index}.jsonl")


def result_files(out: str) -> list[str]:
    """``results.jsonl`` and every host's ``results.p<k>.jsonl`` in ``out``, sorted."""
    return sorted(set(glob.glob(os.path.join(out, RESULTS)) + glob.glob(os.path.join(out, "results.p*.jsonl"))))


def read_results(out: str, problems: Optional[list] = None) -> list[dict]:
    """All result records of ``out`` (every host's file), in file order. Torn lines, records
    without an id and unreadable files are skipped, each noted in ``problems`` when given (else
    an unreadable file raises)."""
    records = []
    for path in result_files(out):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        if problems is not None:
                            problems.append(f"{path}:{n}: not JSON (torn line?), skipped")
                        continue
                    if isinstance(rec, dict) and "id" in rec:
                        records.append(rec)
                    elif problems is not None:
                        problems.append(f"{path}:{n}: no 'id', skipped")
        except OSError as e:
            if problems is None:
                raise
            problems.append(f"cannot read {path}: {e}")
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
        data = (json.dumps(record, default=json_default) + "\n").encode()
        os.write(self.fd, data)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def clean_staging(out: str) -> int:
    """Remove staging folders a killed run left (``.<id>.partial-*``, ``<id>.old-<pid>``)."""
    import shutil

    n = 0
    for path in glob.glob(os.path.join(out, ".*.partial-*")) + glob.glob(os.path.join(out, "*.old-[0-9]*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n


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
