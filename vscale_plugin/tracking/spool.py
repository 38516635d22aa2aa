"""On-disk write-ahead spool of tracking records: one jsonl file per run plus a cursor of what was sent.

Every record goes through the spool before it is sent, so neither a tracking-server outage nor a crash of
the training process loses what reached the disk. The sender appends, sends from the cursor, and only then
advances it; a record that is sent twice (crash between sending and advancing) is harmless because each
record is idempotent once written (metrics carry their original timestamp, which MLflow's SQL store
deduplicates on).

Files for a spool named KEY inside the spool directory:
    KEY.jsonl        records, one JSON object per line, in logging order
    KEY.state.json   run id (once known), tracking URI, byte offset of the first unsent record, highest step per metric
    KEY.lock         held (flock) by the one process sending this spool
    KEY.files/       copies of artifacts waiting to be uploaded
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

_STATE_VERSION = 1


class Spool:
    """One run's records on disk. Not thread-safe: only the logger's sender thread touches an open spool."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory
        self.key = key
        self.path = directory / f"{key}.jsonl"
        self.state_path = directory / f"{key}.state.json"
        self.lock_path = directory / f"{key}.lock"
        self.files_dir = directory / f"{key}.files"
        self.state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "tracking_uri": None,
            "run_id": None,
            "offset": 0,
            "max_steps": {},
        }
        self._lock_fd: int | None = None
        self._load_state()

    def _load_state(self) -> None:
        if self.state_path.exists():
            with contextlib.suppress(OSError, ValueError):
                self.state.update(json.loads(self.state_path.read_text()))

    @classmethod
    def keys_in(cls, directory: Path) -> list[str]:
        return sorted(p.name[: -len(".state.json")] for p in directory.glob("*.state.json"))

    @property
    def run_id(self) -> str | None:
        return self.state["run_id"]

    @property
    def tracking_uri(self) -> str | None:
        return self.state["tracking_uri"]

    def try_lock(self) -> bool:
        """Take the spool for this process; False when another live process (or logger) is sending it."""
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        self._load_state()  # the previous holder may have written it after we first read it
        self._repair()
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _repair(self) -> None:
        # A crash in the middle of an append leaves a partial last line; it was never acknowledged, drop it.
        size = self.size()
        if size:
            with open(self.path, "rb+") as f:
                f.seek(max(0, size - 65536))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    # Records are a few KiB at most (MLflow caps values at 8000 characters): the last complete
                    # one ends inside this tail, or the file holds no complete record.
                    cut = tail.rfind(b"\n")
                    f.truncate(size - len(tail) + cut + 1)
                    _log.warning("%s: dropped an incomplete last record left by a crash", self.path)
        # The file is truncated before the cursor is reset when everything was sent; a crash in between
        # leaves a cursor past the end, which means "all sent".
        self.state["offset"] = min(self.state["offset"], self.size())

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def has_unsent(self) -> bool:
        return self.size() > self.state["offset"]

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            # The spool exists to survive crashes; a record only in the page cache does not survive a node failure.
            os.fsync(f.fileno())
        max_steps = self.state["max_steps"]
        for r in records:
            if r["k"] == "m" and r["s"] > max_steps.get(r["key"], -1):
                max_steps[r["key"]] = r["s"]
        self.save_state()

    def unsent(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Unsent records in order, each with the byte offset just past it (the cursor once it is sent)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - a generator keeps the file open between yields
        except FileNotFoundError:
            return
        with f:
            f.seek(self.state["offset"])
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):
                    return
                end = f.tell()
                try:
                    record = json.loads(line)
                except ValueError:
                    _log.warning("%s: skipping an unreadable record at byte %d", self.path, end - len(line))
                    continue
                yield end, record

    def advance(self, offset: int) -> None:
        self.state["offset"] = offset
        self.save_state()

    def compact(self) -> None:
        """Empty the file once everything in it was sent, so a long healthy run does not grow it forever."""
        if self.state["offset"] and self.state["offset"] == self.size():
            os.truncate(self.path, 0)
            self.state["offset"] = 0
            self.save_state()

    def unsent_count(self) -> int:
        return sum(1 for _ in self.unsent())
