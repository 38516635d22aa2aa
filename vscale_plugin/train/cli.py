"""The launcher's flags (SPEC section 6): parsed and checked (``parse_args``), then resolved into the run's
:class:`~vscale_plugin.train.config.RunConfig` (``build_config``). Every bad input is a one-line error and exit 2,
before any training starts."""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vscale_plugin.data import check_dataset
from vscale_plugin.launch.cli import OneLineParser, UsageError, check_model_config
from vscale_plugin.launch.distributed import from_rank0
from vscale_plugin.launch.ds_config import (
    check_kv_heads,
    check_sequence_parallel_ranks,
    check_tensor_parallel,
    fill_ds_config,
    load_ds_config,
    sequence_parallel_size,
    tensor_parallel_size,
)
from vscale_plugin.ops.vscale import KERNELS, MODES
from vscale_plugin.train.checkpoint import check_resume, has_checkpoint, recorded_settings, resharded_from
from vscale_plugin.train.config import RunConfig
from vscale_plugin.train.recipe import PRESETS, Preset

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DEFAULT_EXPERIMENT = "vscale-plugin"


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
        help="DeepSpeed JSON config, e.g. ds_configs/zero2.json; 'auto' values are filled from the flags; "
        '"tensor_parallel": {"autotp_size": N} trains with DeepSpeed AutoTP (e.g. ds_configs/zero1_tp2.json), '
        '"sequence_parallel_size": N with DeepSpeed Ulysses sequence parallelism (e.g. ds_configs/zero3_sp2.json)',
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
    p.add_argument(
        "--vscale",
        default="learned",
        choices=[*MODES, "off"],
        help="'off' is the baseline; 'backward' the paper's backward-only ablation (baseline forward pass, V-scale's "
        "gradient; SPEC 1)",
    )
    p.add_argument(
        "--vscale_kernel",
        default="eager",
        choices=KERNELS,
        help="V-scale's kernel: eager PyTorch, or fused by torch.compile (falls back to eager where it cannot compile)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="'smoke' (offline, ships with Python), 'c4' (streams allenai/c4 'en'), a PATH to "
        "jsonl/json/parquet/txt files or a saved HF dataset, or the synthetic 'bigram_backcopy[:vocab=64,triggers=3,"
        "sparsity=0.1,task_seed=0]' (default: the preset's: bigram_backcopy for sinklab, else smoke)",
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
        default=None,
        help="measure attention sinks, massive activations and gradient sinks every N steps (0: off; default: the "
        "preset's, about 10 per run for sinklab, else 0)",
    )
    p.add_argument("--save_dir", default=None, help="DeepSpeed checkpoints (default: checkpoints/<run_name>)")
    p.add_argument("--save_every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument(
        "--export_every",
        type=int,
        default=0,
        help="steps between exports of <save_dir>/hf/, a Hugging Face directory of the model, its tokenizer and "
        "generation config (0: only at the end, with the last checkpoint)",
    )
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
    p.add_argument(
        "--experiment",
        default=None,
        help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT}; on --resume the checkpoint's)",
    )
    p.add_argument(
        "--run_name",
        default=None,
        help="MLflow run name (default: <preset>-<vscale>-<time>; on --resume the checkpoint's)",
    )
    p.add_argument("--log_every", type=int, default=1, help="steps between metric logs")
    return p  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each checked on its own and against the others; what needs the ranks waits for build_config."""
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.dataset is None:
        args.dataset = preset.dataset
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
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: the peak learning rate must be > 0, e.g. --lr 3e-4")
    if args.min_lr is not None and not args.min_lr >= 0:
        raise UsageError(f"--min_lr {args.min_lr}: must be >= 0 (0: the cosine decays to zero)")
    if args.stats_every is None:
        args.stats_every = preset.default_stats_every(args.max_steps or preset.max_steps)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise UsageError(f"--stop_after_steps {args.stop_after_steps}: must be >= 1")
    for flag in ("save_every", "export_every"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be >= 0 (0: only at the end)")
    if args.no_checkpoint:
        # --no_checkpoint writes nothing at all: neither DeepSpeed checkpoints nor the hf/ export.
        clash = [f for f, on in (("--save_every", args.save_every), ("--export_every", args.export_every),
                                 ("--resume", args.resume),
                                 ("--stop_after_steps", args.stop_after_steps is not None)) if on]  # fmt: skip
        if clash:
            raise UsageError(f"--no_checkpoint writes no checkpoint and no hf/ export, so {' and '.join(clash)} "
                             "cannot be used with it; drop one of them")  # fmt: skip
    if args.resume and args.save_dir is None:
        raise UsageError("--resume needs --save_dir DIR: the directory of the run to continue")
    return args


def build_config(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The run configuration of parsed flags on ``world_size`` ranks: the recipe and DeepSpeed config resolved, the
    dataset, --init_from and --save_dir checked (the save dir is created), on --resume the checkpoint's settings
    compared. Raises UsageError/ConfigError/DataError. Call it on every rank (it starts with a collective)."""
    # Each rank's clock may be on either side of a second: the default run name (and save dir) is rank 0's.
    started = from_rank0(time.strftime("%Y%m%d-%H%M%S"))
    raw = load_ds_config(args.ds_config, tensor_parallel=True, sequence_parallel=True)
    tp = tensor_parallel_size(raw)
    sp = sequence_parallel_size(raw)
    # before AutoTP's checks: SP with TP is refused whatever the sizes; the model's side of Ulysses (attention, heads,
    # sliding windows) is checked with the model's config, in main; --seq_len once the recipe is resolved
    check_sequence_parallel_ranks(sp, tp, world_size, args.seq_len or PRESETS[args.preset].seq_len)
    if args.init_from is None:  # an --init_from model's heads are checked with the model, below
        preset = PRESETS[args.preset]
        check_kv_heads(tp, preset.kv_heads, f"the {preset.name} preset")
    check_tensor_parallel(tp, world_size, raw.get("zero_optimization", {}).get("stage", 0))
    recipe = PRESETS[args.preset].with_overrides(
        max_steps=args.max_steps, seq_len=args.seq_len, micro_batch=args.micro_batch, global_batch=args.global_batch,
        lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
    )  # fmt: skip
    data_parallel = world_size // (tp * sp)
    if args.global_batch is None and args.micro_batch is not None:
        recipe = recipe.with_overrides(global_batch=max(recipe.global_batch, recipe.micro_batch * data_parallel))
    check_recipe(recipe, args)
    if args.stats_every > recipe.max_steps:
        raise UsageError(
            f"--stats_every {args.stats_every} is more than --max_steps {recipe.max_steps}, so no step would be "
            f"measured; pass --stats_every {recipe.max_steps} or less (0: no statistics)"
        )
    gpu = torch.cuda.is_available()
    ds_config = fill_ds_config(
        raw,
        micro_batch=recipe.micro_batch,
        global_batch=recipe.global_batch,
        world_size=world_size,
        grad_clip=recipe.grad_clip,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        pin_memory=gpu,
    )
    check_dataset(args.dataset)
    if args.init_from is not None:
        model_config = check_init_from(args, recipe.seq_len)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        check_kv_heads(tp, kv_heads, f"--init_from {args.init_from}")
    recorded = recorded_settings(Path(args.save_dir)) if args.resume and has_checkpoint(Path(args.save_dir)) else {}
    run_name = (
        args.run_name
        or recorded.get("run_name")
        or (f"{args.preset if args.init_from is None else 'init'}-{args.vscale}-{started}")
    )
    save_dir = Path(args.save_dir) if args.save_dir is not None else Path("checkpoints") / run_name
    check_save_dir(save_dir, args.resume)
    # another SP size is refused by check_resume, naming it, before any talk of resharding for another TP size
    same_sp = recorded.get("sequence_parallel", 1) == sp
    resharded = resharded_from(recorded, world_size, tp, ds_config.get("zero_optimization", {}).get("stage", 0),
                               save_dir) if args.resume and same_sp else None  # fmt: skip
    if resharded is not None:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    config = RunConfig(
        recipe=recipe,
        init_from=args.init_from,
        vscale=args.vscale,
        vscale_kernel=args.vscale_kernel,
        attn_implementation=args.attn_implementation,
        activation_checkpointing=args.activation_checkpointing,
        seed=args.seed,
        dataset=args.dataset,
        tokenizer=args.tokenizer,
        ds_config=ds_config,
        world_size=world_size,
        tensor_parallel=tp,
        sequence_parallel=sp,
        eval_every=args.eval_every or max(1, recipe.max_steps // 10),
        eval_batches=args.eval_batches,
        stats_every=args.stats_every,
        log_every=args.log_every,
        stop_after_steps=args.stop_after_steps,
        save_dir=save_dir,
        save_every=args.save_every,
        export_every=args.export_every,
        resume=args.resume,
        resume_tensor_parallel=resharded,
        checkpoint=not args.no_checkpoint,
        experiment=args.experiment or recorded.get("experiment") or DEFAULT_EXPERIMENT,
        run_name=run_name,
    )
    check_resume(config, recorded)
    return config


def check_recipe(recipe: Preset, args: argparse.Namespace) -> None:
    """A schedule that does what its flags say: the cosine ends below its peak, not above it."""
    if recipe.min_lr > recipe.lr:
        raise UsageError(
            f"{_as_set(recipe, args, 'min_lr')} is above {_as_set(recipe, args, 'lr')}: the schedule would climb from "
            f"the peak to {recipe.min_lr / recipe.lr:.3g}x it; pass --min_lr {recipe.lr / 10:.3g} (a tenth, as the "
            f"presets do) or anything up to {recipe.lr}"
        )


def _as_set(recipe: Preset, args: argparse.Namespace, field: str) -> str:
    """A recipe value as the user set it: by its flag, or by the preset."""
    value = getattr(recipe, field)
    return f"--{field} {value}" if getattr(args, field) is not None else f"{field} {value} (the {recipe.name} preset's)"


def check_init_from(args: argparse.Namespace, seq_len: int) -> PretrainedConfig:
    """--init_from names a model this run can continue: not a launcher checkpoint, a supported architecture when
    V-scale or the statistics are on, with positions for --seq_len tokens. Returns its transformers config."""
    name = args.init_from
    if not _looks_like_hub_name(name) and not Path(name).exists():
        raise UsageError(f"--init_from {name}: no such directory; give a saved HF model directory or a hub name")
    if has_checkpoint(Path(name)):
        raise UsageError(
            f"--init_from {name} holds launchers/pretrain.py checkpoints, not a Hugging Face model; continue that run "
            f"with --resume --save_dir {name}"
        )
    return check_model_config(
        name,
        "--init_from",
        seq_len,
        needs_registry=args.vscale != "off",
        needs_statistics=args.stats_every > 0,
        hint="or continue it without V-scale and statistics (--vscale off, --stats_every 0)",
    )


def _looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def check_save_dir(save_dir: Path, resume: bool) -> None:
    """A directory that can be written; holding a checkpoint exactly when --resume is given (nothing is ever
    overwritten). Creates nothing: the run makes it once every check has passed (a bad input leaves no empty
    directory behind), so writability is probed in its nearest existing ancestor."""
    found = has_checkpoint(save_dir)
    if resume and not found:
        raise UsageError(
            f"--resume: no checkpoint in {save_dir} (no 'latest' file); start without --resume, or "
            "point --save_dir at the directory of the run to continue"
        )
    if not resume and found:
        raise UsageError(
            f"--save_dir {save_dir} already holds a checkpoint; pass --resume to continue it or choose "
            "another --save_dir"
        )
    existing = next(p for p in (save_dir.absolute(), *save_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--save_dir {save_dir}: not writable ({existing} is a file, not a directory); choose a "
                         "directory you can write to")  # fmt: skip
    probe = existing / f".vsp-write-test-{socket.gethostname()}-{os.getpid()}"  # one per rank: ranks probe at once
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(
            f"--save_dir {save_dir}: not writable ({err.strerror}); choose a directory you can write to"
        ) from err
