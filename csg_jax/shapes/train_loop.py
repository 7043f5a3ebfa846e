"""Plumbing of the shapes trainer's step loop that knows nothing of the model: the JSON-lines
log, the progress bar, clean stops on SIGINT / SIGTERM, the bound on how far dispatch runs ahead
of the device, and the samples/s shown on the bar.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional


class _Log:
    """Appends JSON lines, flushed each time (a killed run keeps what it wrote)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a")

    def write(self, **record) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar (sparse updates when stderr is not a terminal), or None without tqdm."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 15.0, file=sys.stderr)


def _wait_for_older_steps(pending: list, depth: int = 2) -> None:
    """Bounds how far the Python loop runs ahead of the device: JAX dispatches steps
    asynchronously, so without a bound the budget and signal checks see the time of dispatch, and a
    stop comes up to ``log_every`` steps late (69 s past the budget on the CPU). ``pending`` holds
    the metrics of the steps dispatched since the last fetch (which synced the older ones); wait
    until all but the newest ``depth`` have run."""
    if len(pending) > depth:
        import jax

        jax.block_until_ready(pending[-depth - 1]["loss"])


class _StopRequest:
    """SIGINT / SIGTERM during training ask for a clean stop (checkpoint + export) after the
    current step instead of killing the run; a second one stops at once. A no-op off the main
    thread (signal handlers can only be installed there)."""

    def __init__(self):
        import signal
        import threading

        self.signal, self._old = None, {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def __enter__(self) -> "_StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame):
        import signal

        if self.signal is not None:  # asked twice: give up on the clean stop
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _samples_per_s(step: int, start_step: int, t_first: Optional[float], batch_size: int) -> float:
    if t_first is None or step - start_step < 2:
        return 0.0
    return (step - start_step - 1) * batch_size / max(time.perf_counter() - t_first, 1e-9)

