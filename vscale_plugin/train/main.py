"""``deepspeed launchers/pretrain.py``: the training run from flags to MLflow.

Read top to bottom, :func:`run` is the whole run: flags -> :class:`~vscale_plugin.train.config.RunConfig`
(``cli``) -> tokenizer and data -> model (``model``) -> DeepSpeed engine (``engine``) -> checkpoint to resume
(``checkpoint``) -> MLflow run (``mlflow_run``) -> the loop (``loop``), which a signal stops (``stop``).

Everything that can be checked before training is checked before it, on every rank alike (``on_every_rank``), so that
a bad input stops all ranks at the same point with one ``error:`` line and exit code 2, before any work exists.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from vscale_plugin.data import TOKENIZER_CACHE, Batches, DataError, Tokenizer, build_tokenizer, open_batches
from vscale_plugin.launch.cli import ConfigError, fail
from vscale_plugin.launch.distributed import distributed, exit_after_distributed, on_every_rank, rank0_first
from vscale_plugin.train.checkpoint import load_checkpoint
from vscale_plugin.train.cli import build_config, parse_args
from vscale_plugin.train.config import RunConfig
from vscale_plugin.train.engine import build_engine
from vscale_plugin.train.loop import train
from vscale_plugin.train.mlflow_run import check_tracking, open_run
from vscale_plugin.train.model import build_model, check_vocabulary
from vscale_plugin.train.sequence_parallel import check_model, register
from vscale_plugin.train.stop import launcher_processes, stop_on_signals


def run(argv: list[str] | None = None) -> int:
    """Train as the flags ``argv`` say; 0 when done, 2 (and one ``error:`` line) on bad input, 128 + the signal's
    number when a signal (or the launcher's end) stopped it, checkpointed."""
    # Before the process group: a launcher is recognised by the variables it set, which init_distributed sets too.
    launcher = launcher_processes()
    try:
        args = parse_args(argv)
    except ConfigError as err:
        return fail(str(err), rank=int(os.environ.get("RANK", 0)))
    with distributed() as (rank, world_size):
        try:
            rank0_first(check_tracking)  # before anything is created on disk
            config = on_every_rank(build_config, args, world_size)
            tokenizer = on_every_rank(rank0_first, build_tokenizer, config.tokenizer_spec, config.dataset,
                                      TOKENIZER_CACHE)  # fmt: skip
            data, eval_data = on_every_rank(open_data, config, tokenizer, rank)
            on_every_rank(check_vocabulary, config, tokenizer)
            on_every_rank(check_model, config, tokenizer)  # Ulysses' needs of the model, under sequence parallelism
        except (ConfigError, DataError) as err:
            return fail(str(err), rank=rank)
        config.save_dir.mkdir(parents=True, exist_ok=True)  # every check passed: the run's directory
        model = build_model(config, tokenizer)
        mpu = register(model, config)  # Ulysses' attention and SP groups (None without sequence parallelism)
        engine, scheduler = build_engine(model, config.recipe, config.ds_config, mpu)
        start_step, run_id = load_checkpoint(engine, config, rank, data) if config.resume else (0, None)
        # Until here a signal ends the process at once, as usual (nothing is logged or trained yet); from the MLflow
        # run on it stops the run at the next step boundary, checkpointed.
        with stop_on_signals(launcher) as stop:
            logger = open_run(config, model, run_id) if rank == 0 else None
            status = None  # a run that stops early without a signal (--stop_after_steps) stays RUNNING for --resume
            try:
                step = train(engine, scheduler, config, rank, data, eval_data, logger, start_step, stop, tokenizer)
                if step >= config.recipe.max_steps:
                    status = "FINISHED"
                elif stop.stopped_by:
                    status = "KILLED"
            except Exception:
                status = "FAILED"
                raise
            finally:
                if logger is not None:
                    logger.close(status=status)
            if stop.stopped_by:
                # A rank that exits non-zero makes DeepSpeed's launcher terminate the others: none leaves before
                # rank 0 has closed the MLflow run.
                dist.barrier()
    return stop.exit_code


def open_data(config: RunConfig, tokenizer: Tokenizer, rank: int) -> tuple[Batches, Batches]:
    """This rank's training and eval batches, each read up to its first batch now, so that a dataset that cannot
    give them (too small for the eval slice, no documents for a rank, unreadable) fails before training. The data
    is split over the data-parallel ranks: the ranks of one tensor- or sequence-parallel group get the same batches
    (each rank of an SP group trains on its shard of them, ``train.sequence_parallel``)."""
    recipe = config.recipe
    train_data, eval_data = (
        open_batches(config.dataset, tokenizer, recipe.seq_len, recipe.micro_batch,
                     rank=config.data_parallel_rank(rank), world_size=config.data_parallel_size, seed=config.seed,
                     split=split)
        for split in ("train", "eval")
    )  # fmt: skip
    train_data.check()
    eval_data.check()
    return train_data, eval_data


def main() -> None:
    exit_after_distributed(run())
