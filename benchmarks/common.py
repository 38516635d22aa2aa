"""What every benchmark script shares: device sync for honest timings and the closing JSON line."""

from __future__ import annotations

import json
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
