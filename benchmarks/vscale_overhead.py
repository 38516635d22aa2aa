"""What V-scale costs per training step: the same model with and without it, measured side by side.

    python benchmarks/vscale_overhead.py --device cpu --quick          # 0.1B shapes, small batch, a few minutes
    python benchmarks/vscale_overhead.py --device cuda --preset 0.3B     # bf16, sdpa

Full training steps (forward, backward, AdamW step) of a baseline and a V-scale copy of one model, interleaved
A/B/A/B after warm-up so that drifts in clock speed or load hit both alike; median step time of each, their ratio,
tokens/s and peak memory. ``--kernels eager compiled`` adds an arm with the fused (torch.compile) V-scale kernel.
The last line printed is one JSON object: ``ratio`` = V-scale / baseline step time for the first kernel,
``ratios`` per kernel.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit, machine, sync
from vscale_plugin.train.recipe import PRESETS, llama_config

ARM = {"eager": "vscale", "compiled": "vscale_compiled"}  # arm name of each V-scale kernel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.1B")
    p.add_argument("--quick", action="store_true", help="CPU-sized: batch 1 x 256 tokens, 6 timed steps per arm")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: preset micro batch)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 20, 6 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument(
        "--kernels",
        nargs="+",
        choices=["eager", "compiled"],
        default=["eager"],
        help="V-scale kernels, one arm each against the same baseline (compiled: the fused torch.compile path)",
    )
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch = args.batch or (1 if args.quick else preset.micro_batch)
    args.seq_len = args.seq_len or (256 if args.quick else preset.seq_len)
    args.steps = args.steps or (6 if args.quick else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = PRESETS[args.preset]
    vocab = preset.vocab_size or 4096
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = llama_config(preset, vocab, eos_token_id=0)
    baseline = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation, dtype=dtype)
    models = {"baseline": baseline}
    for kernel in args.kernels:
        models[ARM[kernel]] = vsp.apply_vscale(copy.deepcopy(baseline), kernel=kernel)
    arms = {}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        arms[name] = {"model": model, "optimizer": optimizer, "times": [], "peak": 0}
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)

    def step(arm: dict, timed: bool) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        arm["model"](input_ids=ids, labels=ids).loss.backward()
        arm["optimizer"].step()
        arm["optimizer"].zero_grad(set_to_none=True)
        sync(device)
        if timed:
            arm["times"].append(time.perf_counter() - t0)
            if device.type == "cuda":
                arm["peak"] = max(arm["peak"], torch.cuda.max_memory_allocated(device))

    for _ in range(args.warmup):
        for arm in arms.values():
            step(arm, timed=False)
    names = list(arms)
    for i in range(args.steps):
        # A/B, then B/A (with more arms: rotated, so that each runs first, second, ... alike)
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            step(arms[name], timed=True)

    tokens = args.batch * args.seq_len
    medians = {name: statistics.median(arm["times"]) for name, arm in arms.items()}
    result = {
        "benchmark": "vscale_overhead",
        "ratio": medians[ARM[args.kernels[0]]] / medians["baseline"],
        "ratios": {kernel: medians[ARM[kernel]] / medians["baseline"] for kernel in args.kernels},
        "median_step_s": medians,
        "tokens_per_s": {name: tokens / t for name, t in medians.items()},
        "peak_memory_mb": (
            {name: arm["peak"] / 2**20 for name, arm in arms.items()}
            if device.type == "cuda"
            else {"process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        ),
        **machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "timed_steps_per_arm": args.steps,
        "attn_implementation": args.attn_implementation,
    }
    for name in arms:
        print(f"{name:>9}: median step {medians[name]:.4f} s, {result['tokens_per_s'][name]:.0f} tokens/s", flush=True)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
