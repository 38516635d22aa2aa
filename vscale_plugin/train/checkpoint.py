"""A run's checkpoints: DeepSpeed's own, plus each rank's data position and RNG, and what ``launchers/analyze.py``
needs to rebuild the model and its tokenizer from the directory. Resuming restores all of it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vscale_plugin.data import Batches
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.train.config import RunConfig

# What a run is, recorded with its checkpoints, each with the flag that sets it: a --resume that differs in any of these
# is refused, since it would continue another run under this one's name (another --seq_len or batch size in the same
# MLflow run), or fail inside torch or DeepSpeed (another model, ZeRO stage, number of ranks, tensor- or sequence-
# parallel size).
# Every other flag may change between invocations: --stop_after_steps, --save_every, --export_every, --log_every,
# --eval_every and --stats_every say when to stop, save, export, log and measure; --attn_implementation,
# --activation_checkpointing and --vscale_kernel how a step is computed, not what it computes.
RESUME_SETTINGS = {
    "preset": "--preset",
    "init_from": "--init_from",
    "vscale": "--vscale",
    "dataset": "--dataset",
    "tokenizer": "--tokenizer",
    "seed": "--seed",
    "max_steps": "--max_steps",
    "seq_len": "--seq_len",
    "micro_batch": "--micro_batch",
    "global_batch": "--global_batch",
    "lr": "--lr",
    "min_lr": "--min_lr",
    "warmup": "--warmup",
    "eval_batches": "--eval_batches",
    "zero_stage": "--ds_config",
    "world_size": "--num_gpus",
    "tensor_parallel": "--ds_config",
    "sequence_parallel": "--ds_config",
    "experiment": "--experiment",
    "run_name": "--run_name",
}
_RECORD = "vscale_run.json"
UNIVERSAL_SUFFIX = "_universal"


def has_checkpoint(save_dir: Path) -> bool:
    return (save_dir / "latest").is_file()


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The values of RESUME_SETTINGS of a run, as its checkpoints record them."""
    recipe = config.recipe
    return {
        "preset": recipe.name,
        "init_from": config.init_from,
        "vscale": config.vscale,
        "dataset": config.dataset,
        "tokenizer": config.tokenizer,
        "seed": config.seed,
        "max_steps": recipe.max_steps,
        "seq_len": recipe.seq_len,
        "micro_batch": recipe.micro_batch,
        "global_batch": recipe.global_batch,
        "lr": recipe.lr,
        "min_lr": recipe.min_lr,
        "warmup": recipe.warmup,
        "eval_batches": config.eval_batches,
        "zero_stage": config.zero_stage,
        "world_size": config.world_size,
        "tensor_parallel": config.tensor_parallel,
        "sequence_parallel": config.sequence_parallel,
        "experiment": config.experiment,
        "run_name": config.run_name,
    }


def recorded_settings(save_dir: Path) -> dict[str, Any]:
    """The settings the checkpoints in ``save_dir`` were made with ({} for a checkpoint that predates the record)."""
    path = save_dir / _RECORD
    try:
        return json.loads(path.read_text()).get("settings", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume: {path} cannot be read ({err}); resume an intact checkpoint directory") from err


def latest_tag(save_dir: Path) -> str:
    return (save_dir / "latest").read_text().strip()


def universal_dir(save_dir: Path) -> Path:
    """Where the DeepSpeed universal checkpoint of ``save_dir``'s latest checkpoint is expected (``<tag>_universal``),
    written by ``python -m deepspeed.checkpoint.ds_to_universal``."""
    return save_dir / f"{latest_tag(save_dir)}{UNIVERSAL_SUFFIX}"


def resharded_from(recorded: dict[str, Any], world_size: int, tp: int, zero_stage: int, save_dir: Path) -> int | None:
    """The checkpoint's tensor-parallel size when ``--resume`` continues it with another one (``tp``), else None.

    DeepSpeed's checkpoint holds each TP rank's shards (``mp_rank_NN`` files), which only the same split loads; its
    universal checkpoint (``ds_to_universal``) holds whole parameters and optimiser moments, which DeepSpeed loads
    into any split (``"checkpoint": {"load_universal": true}``). The data positions are per data-parallel rank, so the
    number of data-parallel ranks must stay. A UsageError naming both sizes and the fix when it cannot be done."""
    then = recorded.get("tensor_parallel", 1) if recorded else tp
    if then == tp:
        return None
    prefix = f"--resume: the checkpoint in {save_dir} was made with tensor_parallel.autotp_size {then}, not {tp}"
    keep = f"pass a --ds_config with autotp_size {then}"
    then_dp = recorded["world_size"] // then
    if world_size // tp != then_dp:
        raise UsageError(
            f"{prefix}, on {then_dp} data-parallel ranks ({recorded['world_size']} ranks / {then}), not "
            f"{world_size // tp}: each rank continues the data of its data-parallel rank, so their number must stay; "
            f"launch {then_dp * tp} ranks for autotp_size {tp}, or {keep}"
        )
    if zero_stage == 3 or recorded.get("zero_stage") == 3:
        raise UsageError(f"{prefix}; continuing a ZeRO-3 checkpoint with another tensor-parallel size is not "
                         f"verified with the launcher; {keep}")  # fmt: skip
    universal = universal_dir(save_dir)
    if not (universal / "zero").is_dir():
        raise UsageError(
            f"{prefix}. To continue it with autotp_size {tp}, convert it to a DeepSpeed universal checkpoint first "
            f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {save_dir / latest_tag(save_dir)} "
            f"--output_folder {universal} --inject_missing_state) and resume again; or {keep}"
        )
    return then


def check_resume(config: RunConfig, recorded: dict[str, Any]) -> None:
    """A UsageError naming each setting in which ``config`` differs from the checkpoint's, with its value there.
    Another tensor-parallel size (and the number of ranks with it) is allowed when ``config`` continues the
    checkpoint's universal form (``config.resume_tensor_parallel``, from :func:`resharded_from`)."""
    current = run_settings(config)
    if recorded:  # recorded before the launcher ran tensor or sequence parallelism: none
        recorded = {"tensor_parallel": 1, "sequence_parallel": 1, **recorded}
    resharded = {"tensor_parallel", "world_size"} if config.resume_tensor_parallel is not None else set()
    differences = [
        _difference(key, recorded[key], current[key])
        for key in RESUME_SETTINGS
        if key in recorded and recorded[key] != current[key] and key not in resharded
    ]
    if differences:
        raise UsageError(
            f"--resume: the checkpoint in {config.save_dir} was made with {'; '.join(differences)}. A resumed run "
            "keeps its settings: pass the checkpoint's (or leave out a flag whose default it used), or start a new "
            "run in another --save_dir"
        )


def _difference(key: str, then: Any, now: Any) -> str:
    if key == "world_size":
        return f"{then} ranks, not {now} (launch {then}, e.g. deepspeed --num_gpus {then})"
    if key == "tensor_parallel":  # resharded_from has named the way to another size
        return f"tensor_parallel.autotp_size {then}, not {now} (pass a --ds_config with autotp_size {then})"
    if key == "sequence_parallel":
        # The data positions are per data-parallel rank (world / SP of them), so another SP size on as many ranks
        # splits the data another way; DeepSpeed's ZeRO partitions span all ranks either way.
        return (
            f"sequence_parallel_size {then}, not {now} (each rank continues the data of its data-parallel rank, "
            f"world / sequence_parallel_size of them, so the size must stay: pass a --ds_config with "
            f"sequence_parallel_size {then})"
        )
    if key == "zero_stage":
        return f"ZeRO stage {then}, not {now} (pass a --ds_config of stage {then})"
    return f"{RESUME_SETTINGS[key]} {_shown(key, then)}, not {_shown(key, now)}"


def _shown(key: str, value: Any) -> str:
    if value is None:
        return {"init_from": "none (a --preset model)", "tokenizer": "default"}.get(key, "none")
    return str(value)


def save_checkpoint(engine, config: RunConfig, rank: int, step: int, data: Batches, run_id: str | None) -> None:
    """Checkpoint ``step`` in ``config.save_dir`` (tag ``step<8 digits>``); a collective: every rank calls it."""
    save_dir = config.save_dir
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id})
    # Each rank reads its own data shard: its position and RNG are saved next to DeepSpeed's files.
    rank_dir = save_dir / tag
    if rank == 0:
        # What launchers/analyze.py and evaluate.py need to rebuild the model and its tokenizer from this directory,
        # and the MLflow run an evaluation of it is tagged with.
        engine.module.config.save_pretrained(save_dir)
        run = {"tokenizer": config.tokenizer_spec, "dataset": config.dataset, "settings": run_settings(config),
               "mlflow_run_id": run_id}  # fmt: skip
        (save_dir / _RECORD).write_text(json.dumps(run, indent=1))
    (rank_dir / f"data_rank{rank:05d}.json").write_text(json.dumps(data.state_dict()))
    torch.save(_rng_state(), rank_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()


def load_checkpoint(engine, config: RunConfig, rank: int, data: Batches) -> tuple[int, str | None]:
    """Restore the latest checkpoint of ``config.save_dir`` into ``engine`` and ``data`` (and this rank's RNG);
    returns its step and MLflow run id."""
    save_dir = config.save_dir
    saved_by = rank
    if config.resume_tensor_parallel is None:
        path, client = engine.load_checkpoint(str(save_dir))
    else:  # another tensor-parallel size: the universal checkpoint (engine built with load_universal)
        path, client = engine.load_checkpoint(str(save_dir), tag=universal_dir(save_dir).name)
        # the first rank of this rank's data-parallel rank's TP group then; every rank of a group saved the same
        saved_by = config.data_parallel_rank(rank) * config.resume_tensor_parallel
    if path is None:
        raise UsageError(f"--resume: DeepSpeed could not load a checkpoint from {save_dir}")
    tag_dir = save_dir / latest_tag(save_dir)
    data_state = tag_dir / f"data_rank{saved_by:05d}.json"
    if not data_state.is_file():
        raise UsageError(f"--resume: {tag_dir} has no data position for rank {saved_by}; resume with the same "
                         "number of ranks the checkpoint was written with")  # fmt: skip
    data.load_state_dict(json.loads(data_state.read_text()))
    _set_rng_state(torch.load(tag_dir / f"rng_rank{saved_by:05d}.pt", weights_only=False))
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
