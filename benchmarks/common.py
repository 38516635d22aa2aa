"""What every benchmark script shares: device sync for honest timings, the machine a result belongs to, and the
closing JSON line."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the work it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(result: dict, out: str | Path | None) -> dict:
    """Print ``result`` as the last line (one JSON object) and, with ``out``, write the same line there."""
    line = json.dumps(result)
    if out:
        Path(out).write_text(line + "\n")
    print(line, flush=True)
    return result


def machine(device: torch.device) -> dict:
    """Where and when a result was measured: device name, CPU threads, torch version, date."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
