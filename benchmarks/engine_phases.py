"""Where a training step's time goes: forward, backward and optimiser step of a plain model vs a DeepSpeed engine.

    python benchmarks/engine_phases.py --device cpu --preset 0.1B --batch 1 --seq_len 256 --stage 2
    python benchmarks/engine_phases.py --device cuda --preset 0.3B --stage 2                     # bf16 engine

One process, one rank: two copies of the same V-scale model, one trained by a plain loop (``loss.backward()``,
``clip_grad_norm_``, fused ``AdamW.step``), the other by ``deepspeed.initialize`` at ZeRO ``--stage`` with the
launcher's optimiser and clipping, steps interleaved after warm-up. Median seconds of each phase of each; explains a
``launcher_vs_loop.py`` ratio (DeepSpeed reduces and copies gradients into flat buffers even on one rank). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit, machine, sync
from vscale_plugin.launch.distributed import distributed, exit_after_distributed
from vscale_plugin.train.recipe import PRESETS, llama_config

PHASES = ("forward", "backward", "step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.1B")
    p.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage of the engine")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: preset micro batch)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset.micro_batch
    args.seq_len = args.seq_len or preset.seq_len
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with distributed():  # a one-rank process group, as the launcher makes it without a launcher
        return emit(measure(args), args.out)


def measure(args: argparse.Namespace) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = PRESETS[args.preset].with_overrides(seq_len=args.seq_len, micro_batch=args.batch, global_batch=args.batch)
    vocab = preset.vocab_size or 4096
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(llama_config(preset, vocab, eos_token_id=0), attn_implementation="sdpa")
    vsp.apply_vscale(base, sigma=preset.init_std)
    base.config.use_cache = False
    plain = copy.deepcopy(base).to(device).train()
    engine_model = copy.deepcopy(base).train()
    del base

    def adamw(model):
        groups = vsp.decay_parameter_groups(model, preset.weight_decay)
        return torch.optim.AdamW(groups, lr=preset.lr, betas=preset.betas, eps=preset.eps, fused=True)

    optimizer = adamw(plain)
    zero = {"stage": args.stage}
    if args.stage in (1, 2):
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8, allgather_bucket_size=5e8)
    config = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.batch,
              "gradient_accumulation_steps": 1, "gradient_clipping": preset.grad_clip, "bf16": {"enabled": cuda},
              "steps_per_print": 10**9, "zero_optimization": zero}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=engine_model, optimizer=adamw(engine_model), config=config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    times = {arm: {phase: [] for phase in PHASES} for arm in ("plain", "deepspeed")}

    def plain_step():
        with autocast:
            loss = plain(input_ids=ids, labels=ids).loss
        yield
        loss.backward()
        yield
        torch.nn.utils.clip_grad_norm_(plain.parameters(), preset.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield

    def engine_step():
        loss = engine(input_ids=ids, labels=ids).loss
        yield
        engine.backward(loss)
        yield
        engine.step()
        yield

    for i in range(args.warmup + args.steps):
        for arm, step in (("plain", plain_step), ("deepspeed", engine_step)):
            sync(device)
            t0 = time.perf_counter()
            for phase, _ in zip(PHASES, step(), strict=True):
                sync(device)
                now = time.perf_counter()
                if i >= args.warmup:
                    times[arm][phase].append(now - t0)
                t0 = now
    medians = {arm: {phase: statistics.median(t) for phase, t in by.items()} for arm, by in times.items()}
    for arm, by in medians.items():
        print(f"{arm:>9}: " + ", ".join(f"{phase} {t:.4f} s" for phase, t in by.items()) +
              f", total {sum(by.values()):.4f} s", flush=True)  # fmt: skip
    total = {arm: sum(by.values()) for arm, by in medians.items()}
    result = {
        "benchmark": "engine_phases",
        "median_s": medians,
        "total_s": total,
        "ratio": total["deepspeed"] / total["plain"],
        "zero_stage": args.stage,
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "timed_steps": args.steps,
        "precision": "bf16 (engine) / autocast bf16 (plain)" if cuda else "float32",
        **machine(device),
        "deepspeed": deepspeed.__version__,
    }
    return result


if __name__ == "__main__":
    main()
    exit_after_distributed(0)
