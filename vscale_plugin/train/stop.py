"""Stopping a run from outside: SIGINT or SIGTERM to any rank, or the launcher above the ranks going away, stops every
rank at the same step boundary, where the run takes its checkpoint, closes its MLflow run as KILLED and exits with
128 + the signal's number (130 for SIGINT, 143 for SIGTERM and for a launcher that is gone). ``--resume`` continues it.

The ranks agree with one all-reduce of a single integer per step, since a signal reaches each rank at its own moment
(or only one rank) and every rank must leave the loop before the same step's collectives. Signals that come while a
stop is already under way change nothing: a launcher that is stopping sends its own SIGTERM to the ranks after the
user's, and the stop must finish its checkpoint. SIGKILL ends a rank at once.

Why the launcher is watched: on one node, DeepSpeed's runner (the ``deepspeed`` command) forwards no signal to the
per-node launcher it starts, so ``kill -INT <its pid>`` ended the runner alone, and the ranks trained on, orphaned,
to the end. Each rank therefore watches its parent (the per-node launcher) and, under DeepSpeed, the runner above it;
either ending counts as SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from vscale_plugin.launch.distributed import max_over_ranks

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether this run was asked to stop: :meth:`agreed` at each step boundary (a collective)."""

    def __init__(self, launcher: list) -> None:
        self.signum = 0  # the first signal this rank received (or SIGTERM for a launcher gone); 0: none
        self.stopped_by = 0  # the signal all ranks agreed on; set once the run stops
        self._watched = launcher

    def on_signal(self, signum: int, frame: object = None) -> None:
        if not self.signum:
            self.signum = signum

    def agreed(self) -> int:
        """The signal that stops the run, the same on every rank (SIGTERM before SIGINT), or 0: run on."""
        if not self.signum and any(_gone(p) for p in self._watched):
            self.signum = signal.SIGTERM
        self.stopped_by = max_over_ranks(self.signum)
        return self.stopped_by

    @property
    def exit_code(self) -> int:
        """128 + the agreed signal's number, the shell's convention for a process ended by a signal; 0 without one."""
        return 128 + self.stopped_by if self.stopped_by else 0


@contextlib.contextmanager
def stop_on_signals(launcher: list) -> Iterator[StopRequest]:
    """A StopRequest that SIGINT and SIGTERM set while the body runs (instead of ending the process), and the end of
    a process of ``launcher`` (:func:`launcher_processes`); the previous handlers come back afterwards. Outside the
    main thread, where Python cannot catch signals, only the launcher is watched."""
    stop = StopRequest(launcher)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.on_signal) for sig in SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launcher_processes() -> list:
    """The processes whose end means the launcher is gone: under a launcher (LOCAL_RANK set), the parent, and, when
    that is DeepSpeed's per-node launcher (``deepspeed.launcher.launch``), the process that started it. A run started
    by hand (no LOCAL_RANK) watches nothing: its parent is a shell, whose end (nohup) must not stop it. Call it before
    the process group exists, which sets LOCAL_RANK for a run started by hand as well."""
    if "LOCAL_RANK" not in os.environ:
        return []
    import psutil  # a dependency of DeepSpeed

    try:
        parent = psutil.Process().parent()
        if parent is None:
            return []
        watched = [parent]
        if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            runner = parent.parent()
            if runner is not None:
                watched.append(runner)
    except psutil.Error:  # a parent that is already gone, or hidden from this user: nothing to watch
        return []
    return watched


def _gone(process) -> bool:
    """Ended, or ended and not yet reaped by its own parent (a zombie, which psutil counts as running)."""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
