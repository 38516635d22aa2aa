"""How fast the downstream evaluation runs: perplexity tokens/s and NIAH samples/s of a preset-shaped model, as is
and under a fake-quantised scheme, side by side.

    python benchmarks/evaluate_throughput.py --device cpu --preset smoke
    python benchmarks/evaluate_throughput.py --device cuda --preset 1B

Perplexity: forward passes over ``--batch`` windows of the context (``vscale_plugin.evaluate.perplexity``).
NIAH: batched greedy decoding through the KV cache (``vscale_plugin.evaluate.niah.greedy_generate_batch``) of
``--batch`` prompts filling the context, ``--new_tokens`` tokens each (a 7-digit answer is about 11 with the smoke
tokenizer). The model is a randomly initialised V-scaled preset model: speed does not depend on the weights. The last
line printed is one JSON object; ``ratio`` = quantised / as-is time per window and per NIAH batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit, machine, sync
from vscale_plugin.evaluate import quant
from vscale_plugin.evaluate.niah import greedy_generate_batch
from vscale_plugin.evaluate.perplexity import perplexity
from vscale_plugin.train.recipe import PRESETS, llama_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--context", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch", type=int, default=8, help="windows / NIAH prompts per forward")
    p.add_argument("--new_tokens", type=int, default=11, help="tokens generated per NIAH prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement per arm")
    p.add_argument("--quant", default="w8a8_dynamic", choices=quant.SCHEMES[1:], help="the scheme timed against none")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    args.context = args.context or PRESETS[args.preset].seq_len
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
    model = vsp.apply_vscale(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype))
    model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(1, vocab, (args.batch, args.context), generator=gen).to(device)]
    prompts = torch.randint(1, vocab, (args.batch, args.context - args.new_tokens), generator=gen).to(device)
    calibration = [torch.randint(1, vocab, (args.batch, args.context), generator=gen).to(device)]
    arms = {"none": model, args.quant: quant.quantize(model, args.quant, calibration)}

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    times: dict[str, dict[str, list[float]]] = {name: {"ppl": [], "niah": []} for name in arms}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, arm in arms.items():
            ppl_s = timed(lambda arm=arm: perplexity(arm, windows))
            # eos_id None: every prompt generates all its tokens, so each batch does the same work
            niah_s = timed(lambda arm=arm: greedy_generate_batch(arm, prompts, args.new_tokens, eos_id=None))
            if repeat:
                times[name]["ppl"].append(ppl_s)
                times[name]["niah"].append(niah_s)
    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    tokens = args.batch * (args.context - 1)
    result = {
        "benchmark": "evaluate_throughput",
        "preset": args.preset,
        "context": args.context,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "ppl_tokens_per_s": {name: tokens / m["ppl"] for name, m in median.items()},
        "niah_samples_per_s": {name: args.batch / m["niah"] for name, m in median.items()},
        "ratio": {k: median[args.quant][k] / median["none"][k] for k in ("ppl", "niah")},
        **machine(device),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
