"""What the launcher costs over a plain PyTorch loop: tokens/s of the real launcher (DeepSpeed) vs a hand-written loop.

    python benchmarks/launcher_vs_loop.py --device cpu --quick                # smoke preset, a few steps, 1 rank
    python benchmarks/launcher_vs_loop.py --device cuda --preset 0.1B          # 30 steps, ZeRO-2, bf16, MFU

Both train the same model from the same seed on the same data for ``--steps`` optimiser steps on one device: the
preset's Llama with learned V-scale, the smoke corpus packed by the launcher's ``PackedBatches``, the paper's AdamW
(no decay on norms/theta), clipping and warm-up/cosine schedule, micro batch = global batch (no accumulation).

- launcher: ``deepspeed --num_gpus 1 launchers/pretrain.py --ds_config ds_configs/zero2.json --no_checkpoint``, its
  numbers read from the ``train_summary.json`` it writes (median over steps after its first few);
- loop: forward, backward, ``clip_grad_norm_``, ``AdamW.step`` (fused, as the launcher's), ``LambdaLR.step``, the
  next batch fetched inside the timed step as the launcher does. On CUDA it runs the standard PyTorch mixed
  precision recipe (float32 weights, ``torch.autocast`` bf16) where DeepSpeed keeps bf16 weights with float32 master
  copies: both do their matrix products in bf16 and update float32 weights.

The two run one after the other (two programs cannot interleave steps); ``ratio`` = launcher / loop tokens/s, near 1
when DeepSpeed, V-scale's hook, logging and the progress bar cost little. MFU uses the launcher's FLOP count
(``train.throughput.count_flops_per_token``) and the device's dense bf16 peak. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit, machine, sync
from vscale_plugin.data import TOKENIZER_CACHE, PackedBatches, build_tokenizer
from vscale_plugin.testing.distributed import deepspeed_executable, free_port
from vscale_plugin.train.model import new_model
from vscale_plugin.train.recipe import PRESETS, llama_config
from vscale_plugin.train.schedule import lr_lambda
from vscale_plugin.train.throughput import count_flops_per_token, peak_flops

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.1B")
    p.add_argument("--quick", action="store_true", help="CPU-sized: smoke preset, 1 x 128 tokens, 8 steps")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of each (default 30, 8 with --quick)")
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--work_dir", default=None, help="the launcher's save dir, MLflow store and logs (default: temp)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the launcher may take")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "smoke"
    preset = PRESETS[args.preset]
    args.steps = args.steps or (8 if args.quick else 30)
    args.micro_batch = args.micro_batch or (1 if args.quick else preset.micro_batch)
    args.seq_len = args.seq_len or preset.seq_len
    if args.steps < 4:
        p.error(f"--steps {args.steps}: at least 4, so that steps remain after the warm-up ones")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def warmup_excluded(steps: int) -> int:
    """The launcher's rule (train_summary.json): medians skip the first min(5, steps // 3) steps."""
    return min(5, steps // 3)


def run_launcher(args: argparse.Namespace, work: Path) -> dict:
    save_dir = work / "launcher"
    cmd = [str(deepspeed_executable()), "--num_gpus", "1", "--master_port", str(free_port()),
           str(REPO / "launchers" / "pretrain.py"), "--ds_config", args.ds_config, "--preset", args.preset,
           "--max_steps", str(args.steps), "--micro_batch", str(args.micro_batch),
           "--global_batch", str(args.micro_batch), "--seq_len", str(args.seq_len),
           "--eval_every", str(args.steps), "--eval_batches", "1", "--log_every", "10",
           "--attn_implementation", args.attn_implementation, "--experiment", "launcher-vs-loop",
           "--run_name", f"launcher-{args.preset}", "--save_dir", str(save_dir), "--no_checkpoint"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if "MLFLOW_TRACKING_URI" not in env:  # a store of its own; the file store needs no database package
        env.update(MLFLOW_TRACKING_URI=(work / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    # The venv's tools first (ninja for DeepSpeed's JIT ops; the deepspeed launcher itself).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=args.timeout)
    (work / "launcher.log").write_text(proc.stdout + proc.stderr)
    summary_path = save_dir / "train_summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"the launcher failed (exit {proc.returncode}); log in {work / 'launcher.log'}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")  # fmt: skip
    return {**json.loads(summary_path.read_text()), "wall_s": time.perf_counter() - t0}


def run_loop(args: argparse.Namespace, cache_dir: Path) -> dict:
    """The hand-written loop on the launcher's model, data, optimiser and schedule."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = PRESETS[args.preset].with_overrides(
        max_steps=args.steps, micro_batch=args.micro_batch, global_batch=args.micro_batch, seq_len=args.seq_len
    )
    tokenizer = build_tokenizer(None, "smoke", cache_dir)
    data = iter(PackedBatches("smoke", tokenizer, preset.seq_len, preset.micro_batch, seed=0, split="train"))
    config = llama_config(preset, preset.vocab_size or tokenizer.vocab_size, tokenizer.eos_id)
    model = new_model(config, seed=0, attn_implementation=args.attn_implementation)  # the launcher's init (--seed 0)
    model = vsp.apply_vscale(model, sigma=preset.init_std).to(device).train()
    model.config.use_cache = False
    groups = vsp.decay_parameter_groups(model, preset.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=preset.lr, betas=preset.betas, eps=preset.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(preset))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    flops_per_token = count_flops_per_token(config, preset.seq_len)
    peak = peak_flops(device)
    tokens = preset.micro_batch * preset.seq_len
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        batch = next(data).to(device)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().item())  # a host sync, as the launcher's loss logging is
        sync(device)
        times.append(time.perf_counter() - t0)
    kept = times[warmup_excluded(args.steps) :]
    step_s = statistics.median(kept)
    return {
        "median_step_s": step_s,
        "median_tokens_per_s": tokens / step_s,
        "median_mfu": flops_per_token * tokens / step_s / peak if peak else None,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "train_loss": losses[-1],
        "first_loss": losses[0],
        "warmup_steps_excluded": warmup_excluded(args.steps),
        "precision": "float32 weights, autocast bf16" if cuda else "float32",
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="launcher-vs-loop-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(os.environ.get("VSP_CACHE", TOKENIZER_CACHE))
        launcher = run_launcher(args, work)
        print(f" launcher: median step {launcher['median_step_s']:.4f} s, "
              f"{launcher['median_tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
        if args.device == "cuda":
            torch.cuda.empty_cache()
        loop = run_loop(args, cache_dir)
        print(f"     loop: median step {loop['median_step_s']:.4f} s, {loop['median_tokens_per_s']:.0f} tokens/s",
              flush=True)  # fmt: skip
    device = torch.device(args.device)
    result = {
        "benchmark": "launcher_vs_loop",
        "ratio": launcher["median_tokens_per_s"] / loop["median_tokens_per_s"],
        "launcher": launcher,
        "loop": loop,
        "preset": args.preset,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "ds_config": Path(args.ds_config).name,
        **machine(device),
        "attn_implementation": args.attn_implementation,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
