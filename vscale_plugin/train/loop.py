"""The training loop: optimiser steps up to --max_steps (or --stop_after_steps, or a stop request), evaluation, the
statistics, metric logging, checkpoints and hf/ exports on the way and at the end, and the throughput summary."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import warnings

import torch

from vscale_plugin.data import Batches, Tokenizer
from vscale_plugin.launch.distributed import mean_over_ranks
from vscale_plugin.stats import StatsCollector
from vscale_plugin.tracking import RunLogger
from vscale_plugin.train.checkpoint import save_checkpoint
from vscale_plugin.train.config import RunConfig
from vscale_plugin.train.export import HF_DIR, export_hf
from vscale_plugin.train.mlflow_run import log_profiles
from vscale_plugin.train.sequence_parallel import SequenceShards, micro_batch_loss
from vscale_plugin.train.stop import StopRequest
from vscale_plugin.train.throughput import count_flops_per_token, peak_flops, summary


def train(
    engine,
    scheduler,
    config: RunConfig,
    rank: int,
    data: Batches,
    eval_data: Batches,
    logger: RunLogger | None,
    start_step: int,
    stop: StopRequest,
    tokenizer: Tokenizer,
) -> int:
    """Train from ``start_step`` to the step this invocation ends at (``config.end_after``), or to the step boundary
    where ``stop`` is agreed; returns the step reached, checkpointed and exported to ``save_dir/hf/`` (with
    ``tokenizer``). ``logger`` is rank 0's (None elsewhere)."""
    recipe, device = config.recipe, engine.device
    accum = engine.gradient_accumulation_steps()
    tokens_per_step = recipe.global_batch * recipe.seq_len
    flops_per_token = count_flops_per_token(engine.module.config, recipe.seq_len)
    peak = peak_flops(device)
    # On --resume, steps the MLflow run already has (logged after the checkpoint, before a preemption) are not
    # logged twice.
    skip_through = logger.last_logged_step() if logger is not None and config.resume else None
    end = config.end_after(start_step)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=recipe.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0, file=sys.stderr)  # fmt: skip
    batches = iter(data)
    shards = SequenceShards.of(engine, config, rank)
    collector = StatsCollector(engine, every=config.stats_every) if config.stats_every else None
    step = start_step
    # The step the latest checkpoint holds, so that the last one is not written twice.
    saved = start_step if config.resume else None
    exported = None  # the step save_dir/hf/ holds, written by this invocation
    warned = False
    metrics: dict[str, float] = {}
    timings: list[tuple[float, float | None]] = []  # (step_s, mfu) of each step of this invocation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < end and not stop.agreed():
        t0 = time.perf_counter()
        losses = []
        with collector.capture(step + 1) if collector is not None else contextlib.nullcontext():
            for _ in range(accum):
                batch = next(batches).to(device)
                loss = micro_batch_loss(engine, batch, shards)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float().item())
        if device.type == "cuda":
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
            metrics["perf/mfu"] = flops_per_token * tokens_per_step / step_s / (peak * config.world_size)
        timings.append((step_s, metrics.get("perf/mfu")))
        if step % config.eval_every == 0 or step == recipe.max_steps:
            metrics["eval/loss"] = evaluate(engine, eval_data, config.eval_batches, shards)
        stats = collector.result() if collector is not None else {}
        metrics.update(stats)
        new_step = skip_through is None or step > skip_through
        if stats and logger is not None and new_step:
            log_profiles(logger, config.save_dir, step, collector.profiles())
        if not torch.isfinite(torch.tensor(loss)) and not warned and rank == 0:
            warnings.warn(f"train/loss is {loss} at step {step}", stacklevel=1)
            warned = True
        due = step % config.log_every == 0 or "eval/loss" in metrics or bool(stats) or step == end
        if logger is not None and due and new_step:
            logger.log_metrics(metrics, step=step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}", refresh=False)
        if config.save_every and step % config.save_every == 0 and step != end:
            save_checkpoint(engine, config, rank, step, data, logger.run_id if logger else None)
            saved = step
        if config.export_every and step % config.export_every == 0 and step != end:
            export_hf(engine, config.save_dir, rank, tokenizer, config.dataset)
            exported = step
            if progress is not None:
                progress.write(f"step {step}: Hugging Face model in {config.save_dir / HF_DIR}")
    if progress is not None:
        progress.close()
    if rank == 0:
        _write_summary(config, device, step, timings, metrics)
    signalled = f" on {signal.Signals(stop.stopped_by).name}" if stop.stopped_by else ""
    if not config.checkpoint:
        if rank == 0:
            print(f"stopped at step {step}/{recipe.max_steps}{signalled}; no checkpoint (--no_checkpoint)", flush=True)
        return step
    if saved != step:
        save_checkpoint(engine, config, rank, step, data, logger.run_id if logger is not None else None)
    # After the checkpoint: a stop that leaves no time for the export still leaves a run to resume.
    if exported != step:
        export_hf(engine, config.save_dir, rank, tokenizer, config.dataset)
    if rank == 0:
        again = f"; continue it with --resume --save_dir {config.save_dir}" if signalled else ""
        print(f"stopped at step {step}/{recipe.max_steps}{signalled}; checkpoint in {config.save_dir}{again}",
              flush=True)  # fmt: skip
        untokenized = "" if tokenizer.has_text else f"; no tokenizer: {config.dataset} has no text"
        print(f"Hugging Face model of step {step} in {config.save_dir / HF_DIR}{untokenized}", flush=True)
    return step


def evaluate(engine, data: Batches, batches: int, shards: SequenceShards | None = None) -> float:
    """eval/loss: the mean loss of the first ``batches`` micro-batches per rank of the eval split, over all ranks
    (under sequence parallelism each micro-batch's loss combined over its SP group first, which holds it in shards)."""
    losses = []
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(data):
            if i >= batches:
                break
            batch = batch.to(engine.device)
            losses.append(micro_batch_loss(engine, batch, shards).float().item())
    engine.train()
    return mean_over_ranks(losses) if losses else float("nan")


def _write_summary(config: RunConfig, device: torch.device, step: int, timings: list, last: dict) -> None:
    result = summary(config, device, step, timings, last)
    path = config.save_dir / "train_summary.json"
    path.write_text(json.dumps(result, indent=1))
    if timings:
        mfu = result["median_mfu"]
        print(f"median step {result['median_step_s']:.4f} s, {result['median_tokens_per_s']:.0f} tokens/s"
              + (f", MFU {mfu:.3f}" if mfu is not None else "") + f" (steps after the first "
              f"{result['warmup_steps_excluded']}); summary in {path}", flush=True)  # fmt: skip
