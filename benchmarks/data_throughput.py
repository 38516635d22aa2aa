"""Whether the data path keeps up with training: the launcher's tokenise + pack pipeline vs what training consumes.

    python benchmarks/data_throughput.py --quick                          # a few seconds of each, CPU
    python benchmarks/data_throughput.py --device cuda --preset 0.3B      # training measured on the GPU (bf16)
    python benchmarks/data_throughput.py --train_tokens_per_s 250000      # compare with a known training rate

The pipeline is the launcher's own: ``PackedBatches(dataset, tokenizer, seq_len, micro_batch)`` on the C4 sample
(``--dataset``) with the smoke SentencePiece tokenizer (or ``--tokenizer``, anything ``build_tokenizer`` takes),
iterated for ``--batches`` batches or ``--seconds`` seconds, whichever ends first. Training is a few full steps
(forward, backward, AdamW) of the preset's V-scale model at the same seq_len and micro batch on ``--device``,
unless ``--train_tokens_per_s`` gives its rate. Both are per rank: every data-parallel rank packs its own batches.
``headroom`` = pipeline / training tokens/s must be well above 1 for data never to be the bottleneck. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit
from vscale_plugin.data import TOKENIZER_CACHE, PackedBatches, build_tokenizer
from vscale_plugin.train.recipe import PRESETS, llama_config

DEFAULT_DATASET = Path(__file__).resolve().parents[1] / "tests" / "data" / "c4-sample.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset", default=str(DEFAULT_DATASET), help="the C4 sample, 'smoke', or any path PackedBatches reads"
    )
    p.add_argument("--tokenizer", default=None, help="a build_tokenizer spec (default: the smoke SentencePiece model)")
    p.add_argument("--cache_dir", default=str(TOKENIZER_CACHE), help="where the smoke tokenizer is cached")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where training steps are timed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--quick", action="store_true", help="a few seconds of each: 2 s of pipeline, 3 training steps")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--micro_batch", type=int, default=None, help="sequences per batch (default: the preset's)")
    p.add_argument(
        "--batches", type=int, default=None, help="pipeline batches at most (default: no limit, --seconds ends it)"
    )
    p.add_argument("--seconds", type=float, default=None, help="pipeline seconds at most (default 10, 2 --quick)")
    p.add_argument("--train_tokens_per_s", type=float, default=None, help="training rate to compare with (no timing)")
    p.add_argument("--train_steps", type=int, default=None, help="timed training steps (default 10, 3 --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.seq_len = args.seq_len or preset.seq_len
    args.micro_batch = args.micro_batch or preset.micro_batch
    args.batches = args.batches or sys.maxsize
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    args.train_steps = args.train_steps or (3 if args.quick else 10)
    if args.dataset != "smoke" and not Path(args.dataset).exists():
        p.error(
            f"--dataset {args.dataset}: no such file; the C4 sample lives at {DEFAULT_DATASET} in a checkout of the "
            "repository; pass --dataset PATH to another jsonl file"
        )
    if args.device == "cuda" and not torch.cuda.is_available() and args.train_tokens_per_s is None:
        p.error("--device cuda: no CUDA device is visible; use --device cpu or give --train_tokens_per_s")
    return args


def pipeline_rate(args: argparse.Namespace, tokenizer) -> dict:
    """Tokens/s of iterating the launcher's PackedBatches (opening the data is timed apart, as ``setup_s``)."""
    t0 = time.perf_counter()
    data = PackedBatches(args.dataset, tokenizer, args.seq_len, args.micro_batch)
    setup_s = time.perf_counter() - t0
    batches = 0
    t0 = time.perf_counter()
    for batch in data:
        assert batch.shape == (args.micro_batch, args.seq_len)
        batches += 1
        elapsed = time.perf_counter() - t0
        if batches >= args.batches or elapsed >= args.seconds:
            break
    tokens = batches * args.micro_batch * args.seq_len
    return {"tokens_per_s": tokens / elapsed, "batches": batches, "tokens": tokens, "time_s": elapsed,
            "setup_s": setup_s}  # fmt: skip


def training_rate(args: argparse.Namespace, vocab_size: int, eos_id: int) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) of the preset's V-scale model: median step."""
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    config = llama_config(preset, vocab_size, eos_token_id=eos_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation, dtype=dtype)
    model = vsp.apply_vscale(model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (args.micro_batch, args.seq_len), generator=generator).to(device)
    times = []
    for i in range(args.warmup + args.train_steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"tokens_per_s": args.micro_batch * args.seq_len / median, "median_step_s": median,
            "timed_steps": len(times), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(
        args.tokenizer, "smoke" if args.tokenizer is None else args.dataset, Path(args.cache_dir)
    )
    tokenizer_s = time.perf_counter() - t0
    pipeline = pipeline_rate(args, tokenizer)
    print(f"pipeline: {pipeline['tokens_per_s']:.0f} tokens/s ({pipeline['batches']} batches of "
          f"{args.micro_batch} x {args.seq_len} in {pipeline['time_s']:.2f} s)", flush=True)  # fmt: skip
    if args.train_tokens_per_s is not None:
        training = {"tokens_per_s": args.train_tokens_per_s, "source": "--train_tokens_per_s"}
        device_name = None
    else:
        vocab = PRESETS[args.preset].vocab_size or tokenizer.vocab_size
        training = {**training_rate(args, vocab, tokenizer.eos_id), "source": "measured", "vocab_size": vocab}
        device = torch.device(args.device)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"training: {training['tokens_per_s']:.0f} tokens/s ({training['source']})", flush=True)
    headroom = pipeline["tokens_per_s"] / training["tokens_per_s"]
    print(f"headroom: {headroom:.1f}x (pipeline / training; must be >> 1)", flush=True)
    result = {
        "benchmark": "data_throughput",
        "pipeline_tokens_per_s": pipeline["tokens_per_s"],
        "training_tokens_per_s": training["tokens_per_s"],
        "headroom": headroom,
        "pipeline": pipeline,
        "training": training,
        "dataset": str(args.dataset),
        "tokenizer": tokenizer.name,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tokenizer_load_s": tokenizer_s,
        "preset": args.preset,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "device": args.device,
        "device_name": device_name,
        "attn_implementation": args.attn_implementation,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
