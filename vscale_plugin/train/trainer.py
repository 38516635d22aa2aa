"""Pretraining under DeepSpeed: model from a preset (or --init_from), V-scale before ``deepspeed.initialize``,
packed data, the paper's optimiser and schedule, exact checkpoint/resume, metrics to MLflow from rank 0."""

from __future__ import annotations

import json
import math
import random
import subprocess
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vscale_plugin
from vscale_plugin.data import DataError, PackedBatches
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.launch.distributed import mean_over_ranks
from vscale_plugin.launch.ds_config import fill_ds_config, load_ds_config
from vscale_plugin.train.cli import check_save_dir
from vscale_plugin.train.recipe import PRESETS, Preset, llama_config

# Dense bf16 peak FLOP/s per GPU, for MFU; devices not listed get no perf/mfu.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass
class Setup:
    """Everything decided before training; building it is where bad input fails."""

    args: Namespace
    preset: Preset
    ds_config: dict[str, Any]
    save_dir: Path
    rank: int
    world_size: int
    device: torch.device


def prepare(args: Namespace, rank: int, world_size: int) -> Setup:
    """Validate every input and resolve the recipe; raises UsageError/ConfigError/DataError."""
    raw = load_ds_config(args.ds_config)
    preset = PRESETS[args.preset].with_overrides(
        max_steps=args.max_steps, seq_len=args.seq_len, micro_batch=args.micro_batch, global_batch=args.global_batch,
        lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
    )  # fmt: skip
    if args.global_batch is None and args.micro_batch is not None:
        preset = preset.with_overrides(global_batch=max(preset.global_batch, preset.micro_batch * world_size))
    gpu = torch.cuda.is_available()
    ds_config = fill_ds_config(
        raw,
        micro_batch=preset.micro_batch,
        global_batch=preset.global_batch,
        world_size=world_size,
        grad_clip=preset.grad_clip,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        pin_memory=gpu,
    )
    if args.dataset not in ("smoke", "c4") and not Path(args.dataset).exists():
        raise DataError(f"--dataset {args.dataset}: no such file or directory; give a jsonl/json/parquet/txt file, a "
                        "directory of them or a saved HF dataset, or use --dataset smoke / --dataset c4")  # fmt: skip
    if args.init_from is not None and not _looks_like_hub_name(args.init_from) and not Path(args.init_from).exists():
        raise UsageError(
            f"--init_from {args.init_from}: no such directory; give a saved HF model directory or a hub name"
        )
    save_dir = Path(args.save_dir)
    check_save_dir(save_dir, args.resume)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return Setup(args, preset, ds_config, save_dir, rank, world_size, device)


def _looks_like_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def build_model(setup: Setup, tokenizer) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    args, preset = setup.args, setup.preset
    dtype = torch.bfloat16 if setup.ds_config["bf16"]["enabled"] else torch.float32
    zero3 = None
    if setup.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds (or loads) the model straight into ZeRO-3 partitions under
        # zero.Init and runs its weight init on gathered parameters (a bare zero.Init would skip the N(0, 0.02) init).
        zero3 = HfDeepSpeedConfig(setup.ds_config)
    if args.init_from is not None:
        model = vscale_plugin.from_pretrained(args.init_from, attn_implementation=args.attn_implementation, dtype=dtype)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise DataError(
                f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but {args.init_from} has "
                f"{model.config.vocab_size} embeddings; use the model's own tokenizer (--tokenizer)"
            )
    else:
        vocab = preset.vocab_size or tokenizer.vocab_size
        if tokenizer.vocab_size > vocab:
            raise DataError(
                f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but preset {preset.name} has "
                f"a {vocab}-token vocabulary; use a tokenizer with at most {vocab} (the paper's: gpt2)"
            )
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(
            llama_config(preset, vocab, tokenizer.eos_id), attn_implementation=args.attn_implementation
        )
    del zero3
    if args.vscale != "off":
        vscale_plugin.apply_vscale(model, mode=args.vscale, sigma=preset.init_std, kernel=args.vscale_kernel)
    elif vscale_plugin.is_vscaled(model):
        vscale_plugin.remove_vscale(model)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases or V-scale's theta (the paper's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions report their full shape here
        (no_decay if len(shape) < 2 or "vscale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(preset: Preset):
    """Linear warm-up to the peak, then cosine decay to min_lr at max_steps (as a factor of the peak)."""
    floor = preset.min_lr / preset.lr

    def factor(step: int) -> float:
        if step < preset.warmup:
            return (step + 1) / preset.warmup
        progress = min(1.0, (step - preset.warmup) / max(1, preset.max_steps - preset.warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_engine(setup: Setup, model: torch.nn.Module):
    import deepspeed

    preset = setup.preset
    groups = param_groups(model, preset.weight_decay)
    offload = setup.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=preset.lr, betas=preset.betas, eps=preset.eps, adamw_mode=True)
    else:
        # fused: one in-place kernel over ZeRO's flat partitions; the default path allocates temporaries the size
        # of the model for each of its element-wise steps (on CPU this made the launcher 2x slower than a plain loop)
        optimizer = torch.optim.AdamW(groups, lr=preset.lr, betas=preset.betas, eps=preset.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=setup.ds_config
    )
    return engine, scheduler


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def count_flops_per_token(config, seq_len: int) -> float:
    """6N for the matrices plus the attention scores (Chinchilla-style), per trained token."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_o = 2 * d * config.num_attention_heads * head_dim
    k_v = 2 * d * config.num_key_value_heads * head_dim
    mlp = 3 * d * config.intermediate_size
    params = layers * (q_o + k_v + mlp) + config.vocab_size * d
    attention = 2 * 2 * layers * seq_len * config.num_attention_heads * head_dim / 2  # causal: half the scores
    return 6 * params + 3 * attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def evaluate(engine, setup: Setup, tokenizer) -> float:
    data = PackedBatches(setup.args.dataset, tokenizer, setup.preset.seq_len, setup.preset.micro_batch,
                         rank=setup.rank, world_size=setup.world_size, seed=setup.args.seed, split="eval")  # fmt: skip
    losses = []
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(data):
            if i >= setup.args.eval_batches:
                break
            batch = batch.to(setup.device)
            losses.append(engine(input_ids=batch, labels=batch).loss.float().item())
    engine.train()
    return mean_over_ranks(losses) if losses else float("nan")


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


def save_checkpoint(engine, setup: Setup, step: int, data: PackedBatches, run_id: str | None) -> None:
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(setup.save_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id})
    # Each rank reads its own data shard: its position and RNG are saved next to DeepSpeed's files.
    rank_dir = setup.save_dir / tag
    if setup.rank == 0:
        # What launchers/analyze.py needs to rebuild the model and its tokenizer from this directory.
        engine.module.config.save_pretrained(setup.save_dir)
        run = {"tokenizer": setup.args.tokenizer or setup.args.init_from, "dataset": setup.args.dataset}
        (setup.save_dir / "vscale_run.json").write_text(json.dumps(run))
    (rank_dir / f"data_rank{setup.rank:05d}.json").write_text(json.dumps(data.state_dict()))
    torch.save(_rng_state(), rank_dir / f"rng_rank{setup.rank:05d}.pt")
    dist.barrier()


def load_checkpoint(engine, setup: Setup, data: PackedBatches) -> tuple[int, str | None]:
    path, client = engine.load_checkpoint(str(setup.save_dir))
    if path is None:
        raise UsageError(f"--resume: DeepSpeed could not load a checkpoint from {setup.save_dir}")
    tag_dir = Path(path) if Path(path).is_dir() else setup.save_dir / (setup.save_dir / "latest").read_text().strip()
    data_state = tag_dir / f"data_rank{setup.rank:05d}.json"
    if not data_state.is_file():
        raise UsageError(f"--resume: {tag_dir} has no data position for rank {setup.rank}; resume with the same "
                         "number of ranks the checkpoint was written with")  # fmt: skip
    data.load_state_dict(json.loads(data_state.read_text()))
    _set_rng_state(torch.load(tag_dir / f"rng_rank{setup.rank:05d}.pt", weights_only=False))
    return int(client["step"]), client.get("mlflow_run_id")
