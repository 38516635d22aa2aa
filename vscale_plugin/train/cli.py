"""The launcher's flags (SPEC section 6) and their validation. Every bad input is a one-line error and exit 2,
before any training starts."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vscale_plugin.launch.cli import OneLineParser, UsageError
from vscale_plugin.train.recipe import PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="deepspeed launchers/pretrain.py",
        description="Pretrain a Llama model with or without V-scale under DeepSpeed, logged to MLflow.",
    )
    p.add_argument(
        "--ds_config",
        "--deepspeed_config",
        dest="ds_config",
        default=None,
        help="DeepSpeed JSON config, e.g. ds_configs/zero2.json; 'auto' values are filled from the flags",
    )
    p.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher"
    )
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="model + recipe (SPEC section 5)")
    p.add_argument(
        "--init_from",
        default=None,
        help="continue pretraining an existing HF Llama/Mistral model (name or path) instead of a preset",
    )
    p.add_argument("--vscale", default="learned", choices=["learned", "fixed", "off"], help="'off' is the baseline")
    p.add_argument(
        "--vscale_kernel",
        default="eager",
        choices=["eager", "compiled"],
        help="V-scale's kernel: eager PyTorch, or fused by torch.compile (falls back to eager where it cannot compile)",
    )
    p.add_argument(
        "--dataset",
        default="smoke",
        help="'smoke' (offline, ships with Python), 'c4' (streams allenai/c4 'en'), or a PATH to "
        "jsonl/json/parquet/txt files or a saved HF dataset",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer name/path or a SentencePiece .model (default: trained on the smoke corpus for "
        "--dataset smoke, the --init_from model's, else gpt2)",
    )
    p.add_argument("--max_steps", type=int, default=None, help="optimiser steps of the whole run (sets the schedule)")
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per rank per micro-batch")
    p.add_argument("--global_batch", type=int, default=None, help="sequences per optimiser step, all ranks")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min_lr", type=float, default=None, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "flex_attention"]
    )
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--eval_every", type=int, default=None, help="steps between evaluations (default: 10 per run)")
    p.add_argument("--eval_batches", type=int, default=4, help="micro-batches per rank for eval/loss")
    p.add_argument(
        "--stats_every",
        type=int,
        default=0,
        help="measure attention sinks, massive activations and gradient sinks every N steps (0: off)",
    )
    p.add_argument("--save_dir", default=None, help="DeepSpeed checkpoints (default: checkpoints/<run_name>)")
    p.add_argument("--save_every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest checkpoint in --save_dir: model, optimiser, schedule, data, RNG, MLflow run",
    )
    p.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="stop cleanly (checkpoint saved) after K steps of this invocation, as a preemption would",
    )
    p.add_argument(
        "--no_checkpoint",
        action="store_true",
        help="write no checkpoint, not even at the end (throughput runs); such a run cannot be resumed",
    )
    p.add_argument("--experiment", default="vscale-plugin", help="MLflow experiment")
    p.add_argument("--run_name", default=None, help="MLflow run name (default: <preset>-<vscale>-<time>)")
    p.add_argument("--log_every", type=int, default=1, help="steps between metric logs")
    return p  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.ds_config is None:
        raise UsageError("--ds_config is required; e.g. --ds_config ds_configs/zero2.json")
    for flag in (
        "max_steps",
        "seq_len",
        "micro_batch",
        "global_batch",
        "warmup",
        "eval_batches",
        "log_every",
        "stats_every",
    ):
        value = getattr(args, flag)
        least = 0 if flag in ("warmup", "stats_every") else 1
        if value is not None and value < least:
            raise UsageError(f"--{flag} {value}: must be >= {least}")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise UsageError(f"--stop_after_steps {args.stop_after_steps}: must be >= 1")
    if args.no_checkpoint:
        clash = [f for f, on in (("--save_every", args.save_every), ("--resume", args.resume),
                                 ("--stop_after_steps", args.stop_after_steps is not None)) if on]  # fmt: skip
        if clash:
            raise UsageError(f"--no_checkpoint writes no checkpoint, so {' and '.join(clash)} cannot be used with it; "
                             "drop one of them")  # fmt: skip
    if args.run_name is None:
        args.run_name = (
            f"{args.preset if args.init_from is None else 'init'}-{args.vscale}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    if args.save_dir is None:
        if args.resume:
            raise UsageError("--resume needs --save_dir DIR: the directory of the run to continue")
        args.save_dir = str(Path("checkpoints") / args.run_name)
    return args


def check_save_dir(save_dir: Path, resume: bool) -> None:
    """A writable directory; holding a checkpoint exactly when --resume is given (nothing is ever overwritten)."""
    has_checkpoint = (save_dir / "latest").is_file()
    if resume and not has_checkpoint:
        raise UsageError(
            f"--resume: no checkpoint in {save_dir} (no 'latest' file); start without --resume, or "
            "point --save_dir at the directory of the run to continue"
        )
    if not resume and has_checkpoint:
        raise UsageError(
            f"--save_dir {save_dir} already holds a checkpoint; pass --resume to continue it or choose "
            "another --save_dir"
        )
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"--save_dir {save_dir}: not writable ({err.strerror}); choose a directory you can write to"
        ) from err
