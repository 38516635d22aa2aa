"""``deepspeed launchers/pretrain.py``: the training run from flags to MLflow.

Read top to bottom, :func:`run` is the whole run: flags -> :class:`~vscale_plugin.train.config.RunConfig`
(``cli``) -> tokenizer and data -> model (``model``) -> DeepSpeed engine (``engine``) -> checkpoint to resume
(``checkpoint``) -> MLflow run (``mlflow_run``) -> the loop (``loop``).
"""

from __future__ import annotations

from vscale_plugin.data import TOKENIZER_CACHE, DataError, PackedBatches, build_tokenizer
from vscale_plugin.launch.cli import ConfigError, fail
from vscale_plugin.launch.distributed import distributed, exit_after_distributed, rank0_first
from vscale_plugin.train.checkpoint import load_checkpoint
from vscale_plugin.train.cli import build_config, parse_args
from vscale_plugin.train.engine import build_engine
from vscale_plugin.train.loop import train
from vscale_plugin.train.mlflow_run import check_tracking, open_run
from vscale_plugin.train.model import build_model


def run(argv: list[str] | None = None) -> int:
    """Train as the flags ``argv`` say; 0 when done, 2 (and one ``error:`` line) on bad input."""
    try:
        args = parse_args(argv)
    except ConfigError as err:
        return fail(str(err))
    with distributed() as (rank, world_size):
        try:
            rank0_first(check_tracking)  # before anything is created on disk
            config = build_config(args, world_size)
            tokenizer = rank0_first(build_tokenizer, config.tokenizer_spec, config.dataset, TOKENIZER_CACHE)
            recipe = config.recipe
            data = PackedBatches(config.dataset, tokenizer, recipe.seq_len, recipe.micro_batch, rank=rank,
                                 world_size=world_size, seed=config.seed, split="train")  # fmt: skip
            model = build_model(config, tokenizer)
        except (ConfigError, DataError) as err:
            return fail(str(err))
        engine, scheduler = build_engine(model, recipe, config.ds_config)
        start_step, run_id = load_checkpoint(engine, config, rank, data) if config.resume else (0, None)
        logger = open_run(config, model, run_id) if rank == 0 else None
        finished = False
        try:
            finished = train(engine, scheduler, config, rank, data, tokenizer, logger, start_step)
        finally:
            if logger is not None:
                # A run stopped early stays RUNNING, so that --resume continues it.
                logger.close(status="FINISHED" if finished else None)
    return 0


def main() -> None:
    exit_after_distributed(run())
