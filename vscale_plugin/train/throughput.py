"""Throughput of a run: FLOPs per token, the GPU's peak (for MFU) and the summary rank 0 writes at the end
(``<save_dir>/train_summary.json``)."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from vscale_plugin.train.config import RunConfig

# Dense bf16 peak FLOP/s per GPU, for MFU; devices not listed get no perf/mfu.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


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


def summary(
    config: RunConfig, device: torch.device, step: int, timings: list[tuple[float, float | None]], last: dict
) -> dict[str, Any]:
    """Throughput of this invocation, for benchmarks and for comparing runs: medians over its steps after the
    first few (warm-up: allocator, kernel autotuning, compilation), peak GPU memory, final losses.
    ``timings`` holds (step_s, mfu) per step; ``last`` the metrics of the last step."""
    skip = min(5, len(timings) // 3)
    kept = timings[skip:]
    step_s = statistics.median(t for t, _ in kept) if kept else None
    mfus = [m for _, m in kept if m is not None]
    recipe = config.recipe
    tokens_per_step = recipe.global_batch * recipe.seq_len
    return {
        "step": step,
        "max_steps": recipe.max_steps,
        "steps_this_invocation": len(timings),
        "warmup_steps_excluded": skip,
        "median_step_s": step_s,
        "median_tokens_per_s": tokens_per_step / step_s if step_s else None,
        "median_mfu": statistics.median(mfus) if mfus else None,
        "tokens_per_step": tokens_per_step,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "train_loss": last.get("train/loss"),
        "eval_loss": last.get("eval/loss"),
        "preset": recipe.name,
        "seq_len": recipe.seq_len,
        "micro_batch": recipe.micro_batch,
        "global_batch": recipe.global_batch,
        "world_size": config.world_size,
        "tensor_parallel": config.tensor_parallel,
        "sequence_parallel": config.sequence_parallel,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bfloat16" if config.bf16 else "float32",
        "zero_stage": config.zero_stage,
        "vscale": config.vscale,
        "vscale_kernel": config.vscale_kernel,
        "attn_implementation": config.attn_implementation,
    }
