"""``deepspeed launchers/pretrain.py``: the training run from flags to MLflow."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import vscale_plugin
from vscale_plugin.data import TOKENIZER_CACHE, DataError, PackedBatches, build_tokenizer
from vscale_plugin.launch.cli import ConfigError, fail
from vscale_plugin.launch.distributed import distributed, exit_after_distributed, mean_over_ranks, rank0_first
from vscale_plugin.stats import StatsCollector
from vscale_plugin.tracking import RunLogger, TrackingStoreError, check_tracking_store, default_tracking_uri
from vscale_plugin.train import trainer
from vscale_plugin.train.cli import parse_args


def _logger(setup: trainer.Setup, model, run_id: str | None) -> RunLogger:
    args = setup.args
    tags = {"vscale": args.vscale, "preset": args.preset if args.init_from is None else "init_from"}
    logger = RunLogger(
        experiment=args.experiment,
        run_name=args.run_name,
        run_id=run_id,
        tracking_uri=default_tracking_uri(),
        tags=tags,
        spool_dir=setup.save_dir / "mlflow-spool",
    )
    if run_id is None:
        logger.log_params(
            {
                "model": model.config.to_dict(),
                "recipe": setup.preset.as_dict(),
                "deepspeed": setup.ds_config,
                "vscale": args.vscale,
                "vscale_kernel": args.vscale_kernel,
                "dataset": args.dataset,
                "tokenizer": args.tokenizer or "default",
                "init_from": args.init_from or "",
                "world_size": setup.world_size,
                "seed": args.seed,
                "attn_implementation": args.attn_implementation,
                "package_version": vscale_plugin.__version__,
                "git_commit": trainer.git_commit(),
            }
        )
    return logger


def _check_tracking(uri: str) -> None:
    try:
        check_tracking_store(uri)
    except TrackingStoreError as err:
        raise ConfigError(str(err)) from err


def run(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as err:
        return fail(str(err))
    with distributed() as (rank, world_size):
        return _run(args, rank, world_size)


def _run(args, rank: int, world_size: int) -> int:
    try:
        rank0_first(_check_tracking, default_tracking_uri())  # before anything is created on disk
        setup = trainer.prepare(args, rank, world_size)
        spec = args.tokenizer or args.init_from  # a model to continue brings its own tokenizer
        tokenizer = rank0_first(build_tokenizer, spec, args.dataset, TOKENIZER_CACHE)
        data = PackedBatches(args.dataset, tokenizer, setup.preset.seq_len, setup.preset.micro_batch, rank=rank,
                             world_size=world_size, seed=args.seed, split="train")  # fmt: skip
        model = trainer.build_model(setup, tokenizer)
    except (ConfigError, DataError) as err:
        return fail(str(err))
    engine, scheduler = trainer.build_engine(setup, model)
    start_step, run_id = 0, None
    if args.resume:
        start_step, run_id = trainer.load_checkpoint(engine, setup, data)
    logger = _logger(setup, model, run_id) if rank == 0 else None
    if logger is not None:
        uri = default_tracking_uri()
        print(f"MLflow: experiment '{args.experiment}', run '{args.run_name}' in {uri}", flush=True)
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            print(f"  open it with: mlflow ui --backend-store-uri {uri}", flush=True)
    finished = False
    try:
        finished = _train(engine, scheduler, setup, data, tokenizer, logger, start_step)
    finally:
        if logger is not None:
            # A run stopped early stays RUNNING, so that --resume continues it.
            logger.close(status="FINISHED" if finished else None)
    return 0


def _log_profiles(logger: RunLogger, save_dir: Path, step: int, profiles: dict) -> None:
    """The per-position gradient norms the paper plots (positions 0..63, per layer), as a run artifact."""
    path = Path(save_dir) / "stats" / f"profiles_step{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, **profiles}))
    logger.log_artifact(path, artifact_path="stats")


def _train(engine, scheduler, setup, data, tokenizer, logger, start_step: int) -> bool:
    """Train up to --max_steps or --stop_after_steps; True when the run reached max_steps."""
    args, preset = setup.args, setup.preset
    accum = engine.gradient_accumulation_steps()
    tokens_per_step = preset.global_batch * preset.seq_len
    flops_per_token = trainer.count_flops_per_token(engine.module.config, preset.seq_len)
    peak = trainer.peak_flops(setup.device)
    eval_every = args.eval_every or max(1, preset.max_steps // 10)
    skip_through = logger.last_logged_step() if logger is not None and args.resume else None
    end = (
        preset.max_steps if args.stop_after_steps is None else min(preset.max_steps, start_step + args.stop_after_steps)
    )
    progress = None
    if setup.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=preset.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)  # fmt: skip
    batches = iter(data)
    collector = StatsCollector(engine, every=args.stats_every) if args.stats_every else None
    step = start_step
    warned = False
    timings: list[tuple[float, float | None]] = []  # (step_s, mfu) of each step of this invocation
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    while step < end:
        t0 = time.perf_counter()
        losses = []
        with collector.capture(step + 1) if collector is not None else contextlib.nullcontext():
            for _ in range(accum):
                batch = next(batches).to(setup.device)
                loss = engine(input_ids=batch, labels=batch).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float().item())
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        step += 1
        loss = mean_over_ranks(losses)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        metrics = {
            "train/loss": loss,
            "train/lr": scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "perf/step_s": step_s,
            "perf/tokens_per_s": tokens_per_step / step_s,
        }
        if peak is not None:
            metrics["perf/mfu"] = flops_per_token * tokens_per_step / step_s / (peak * setup.world_size)
        timings.append((step_s, metrics.get("perf/mfu")))
        if step % eval_every == 0 or step == preset.max_steps:
            metrics["eval/loss"] = trainer.evaluate(engine, setup, tokenizer)
        stats = collector.result() if collector is not None else {}
        metrics.update(stats)
        if stats and logger is not None and (skip_through is None or step > skip_through):
            _log_profiles(logger, setup.save_dir, step, collector.profiles())
        if not torch.isfinite(torch.tensor(loss)) and not warned and setup.rank == 0:
            warnings.warn(f"train/loss is {loss} at step {step}", stacklevel=1)
            warned = True
        due = step % args.log_every == 0 or "eval/loss" in metrics or bool(stats) or step == end
        if logger is not None and due and (skip_through is None or step > skip_through):
            logger.log_metrics(metrics, step=step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}", refresh=False)
        if args.save_every and step % args.save_every == 0 and step != end:
            trainer.save_checkpoint(engine, setup, step, data, logger.run_id if logger else None)
    if progress is not None:
        progress.close()
    run_id = logger.run_id if logger is not None else None
    if setup.rank == 0:
        summary = _summary(setup, step, timings, tokens_per_step, metrics if timings else {})
        (Path(setup.save_dir) / "train_summary.json").write_text(json.dumps(summary, indent=1))
        if timings:
            mfu = summary["median_mfu"]
            print(f"median step {summary['median_step_s']:.4f} s, {summary['median_tokens_per_s']:.0f} tokens/s"
                  + (f", MFU {mfu:.3f}" if mfu is not None else "") + f" (steps after the first "
                  f"{summary['warmup_steps_excluded']}); summary in {setup.save_dir / 'train_summary.json'}",
                  flush=True)  # fmt: skip
    if args.no_checkpoint:
        if setup.rank == 0:
            print(f"stopped at step {step}/{preset.max_steps}; no checkpoint (--no_checkpoint)", flush=True)
    else:
        if step > start_step or not (Path(setup.save_dir) / "latest").is_file():
            trainer.save_checkpoint(engine, setup, step, data, run_id)
        if setup.rank == 0:
            print(f"stopped at step {step}/{preset.max_steps}; checkpoint in {setup.save_dir}", flush=True)
    return step >= preset.max_steps


def _summary(setup, step: int, timings: list, tokens_per_step: int, last: dict) -> dict:
    """Throughput of this invocation, for benchmarks and for comparing runs: medians over its steps after the
    first few (warm-up: allocator, kernel autotuning, compilation), peak GPU memory, final losses."""
    skip = min(5, len(timings) // 3)
    kept = timings[skip:]
    step_s = statistics.median(t for t, _ in kept) if kept else None
    mfus = [m for _, m in kept if m is not None]
    preset = setup.preset
    return {
        "step": step,
        "max_steps": preset.max_steps,
        "steps_this_invocation": len(timings),
        "warmup_steps_excluded": skip,
        "median_step_s": step_s,
        "median_tokens_per_s": tokens_per_step / step_s if step_s else None,
        "median_mfu": statistics.median(mfus) if mfus else None,
        "tokens_per_step": tokens_per_step,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated(setup.device) / 2**20 if setup.device.type == "cuda" else None
        ),
        "train_loss": last.get("train/loss"),
        "eval_loss": last.get("eval/loss"),
        "preset": preset.name,
        "seq_len": preset.seq_len,
        "micro_batch": preset.micro_batch,
        "global_batch": preset.global_batch,
        "world_size": setup.world_size,
        "device": torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu",
        "dtype": "bfloat16" if setup.ds_config["bf16"]["enabled"] else "float32",
        "zero_stage": setup.ds_config.get("zero_optimization", {}).get("stage", 0),
        "vscale": setup.args.vscale,
        "vscale_kernel": setup.args.vscale_kernel,
        "attn_implementation": setup.args.attn_implementation,
    }


def main() -> None:
    exit_after_distributed(run())
