"""A run's checkpoints: DeepSpeed's own, plus each rank's data position and RNG, and what ``launchers/analyze.py``
needs to rebuild the model and its tokenizer from the directory. Resuming restores all of it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vscale_plugin.data import PackedBatches
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.train.config import RunConfig


def has_checkpoint(save_dir: Path) -> bool:
    return (save_dir / "latest").is_file()


def save_checkpoint(engine, config: RunConfig, rank: int, step: int, data: PackedBatches, run_id: str | None) -> None:
    """Checkpoint ``step`` in ``config.save_dir`` (tag ``step<8 digits>``); a collective: every rank calls it."""
    save_dir = config.save_dir
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id})
    # Each rank reads its own data shard: its position and RNG are saved next to DeepSpeed's files.
    rank_dir = save_dir / tag
    if rank == 0:
        # What launchers/analyze.py needs to rebuild the model and its tokenizer from this directory.
        engine.module.config.save_pretrained(save_dir)
        run = {"tokenizer": config.tokenizer_spec, "dataset": config.dataset}
        (save_dir / "vscale_run.json").write_text(json.dumps(run))
    (rank_dir / f"data_rank{rank:05d}.json").write_text(json.dumps(data.state_dict()))
    torch.save(_rng_state(), rank_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()


def load_checkpoint(engine, config: RunConfig, rank: int, data: PackedBatches) -> tuple[int, str | None]:
    """Restore the latest checkpoint of ``config.save_dir`` into ``engine`` and ``data`` (and this rank's RNG);
    returns its step and MLflow run id."""
    save_dir = config.save_dir
    path, client = engine.load_checkpoint(str(save_dir))
    if path is None:
        raise UsageError(f"--resume: DeepSpeed could not load a checkpoint from {save_dir}")
    tag_dir = Path(path) if Path(path).is_dir() else save_dir / (save_dir / "latest").read_text().strip()
    data_state = tag_dir / f"data_rank{rank:05d}.json"
    if not data_state.is_file():
        raise UsageError(f"--resume: {tag_dir} has no data position for rank {rank}; resume with the same "
                         "number of ranks the checkpoint was written with")  # fmt: skip
    data.load_state_dict(json.loads(data_state.read_text()))
    _set_rng_state(torch.load(tag_dir / f"rng_rank{rank:05d}.pt", weights_only=False))
    return int(client["step"]), client.get("mlflow_run_id")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
