"""What the statistics collector costs: no collector vs an idle one vs a capture step, measured side by side.

    python benchmarks/collector_overhead.py --device cpu --quick          # smoke shapes + a small model, minutes
    python benchmarks/collector_overhead.py --device cuda --preset 0.3B     # bf16, sdpa

Full training steps (forward, backward, AdamW step) of one V-scale Llama under four arms, interleaved in a rotating
order after warm-up: (a) no collector, (b) an idle collector (``capture(step)`` on a step that is not due: no hooks),
(c) a capture step (due: hooks, statistics, parameter-gradient norms), (d) the same capture step without the qr/
quantisation-readiness statistics (``quant_readiness=False``); ``qr_ratio`` = (c) / (d) is what they cost a capture
step (median of the medians' ratio, and ``paired``: the median of per-round ratios). Median step time of each, the
ratios to (a),
and the amortised cost at ``every`` = 10/100/1000, ((every - 1) * idle + capture) / (every * none). Step times of
a few percent noise cannot resolve the 0.5% idle target, so the idle collector's own cost is also timed directly:
``idle_call_s`` per ``capture()`` of a step that is not due (20k calls), giving ``ratio_idle_direct`` =
(none + idle_call) / none and ``amortised_direct``; ``paired_ratio`` is the median of per-round ratios.

Peak memory of a capture step vs a normal step at each ``--seq_lens`` T: on CUDA ``torch.cuda.max_memory_allocated``
(reset before each step); on CPU each (T, arm) runs in a fresh subprocess of this script and reads the process's peak
RSS (``ru_maxrss`` never goes down within a process). ``extra_mb`` = capture - normal per T shows whether the
statistics grow linearly in T (extra doubles when T doubles) or quadratically (it quadruples).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import vscale_plugin as vsp
from benchmarks.common import emit, machine, sync
from vscale_plugin.stats.collector import StatsCollector
from vscale_plugin.train.recipe import PRESETS, llama_config

ARMS = ("none", "idle", "capture", "capture_no_qr")
EVERY = (10, 100, 1000)
COLLECT_EVERY = 1000  # capture(0) is due, capture(1) is not


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.1B")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: timing on smoke shapes (batch 2 x 256), memory on 4 layers x hidden 512, batch 1",
    )
    p.add_argument("--batch", type=int, default=None, help="sequences per timed step (default: preset micro batch)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per timed sequence (default: preset context)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 20, 15 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096], help="memory: sequence lengths")
    p.add_argument("--mem_batch", type=int, default=None, help="memory: sequences per step (default 1)")
    p.add_argument("--mem_layers", type=int, default=None, help="memory: layers (default: 4 with --quick, preset's)")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--_memory_probe", nargs=2, metavar=("T", "ARM"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    timing = PRESETS["smoke"] if args.quick else PRESETS[args.preset]
    args.timing_preset = timing.name
    args.batch = args.batch or (2 if args.quick else timing.micro_batch)
    args.seq_len = args.seq_len or (256 if args.quick else timing.seq_len)
    args.steps = args.steps or (15 if args.quick else 20)
    args.mem_batch = args.mem_batch or 1
    args.mem_layers = args.mem_layers or (4 if args.quick else PRESETS[args.preset].layers)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def _build(preset_name: str, seq_len: int, device: torch.device, dtype: torch.dtype, attn: str, **overrides):
    from transformers import AutoModelForCausalLM

    preset = PRESETS[preset_name].with_overrides(seq_len=seq_len, **overrides)
    vocab = preset.vocab_size or 4096
    torch.manual_seed(0)
    config = llama_config(preset, vocab, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model = vsp.apply_vscale(model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return model, optimizer, StatsCollector(model, every=COLLECT_EVERY, distributed=False), vocab


def _step(model, optimizer, collector, ids: torch.Tensor, arm: str) -> None:
    """One full training step; forward and backward inside the capture (the collector reads the gradients there)."""
    if arm == "none":
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        due = arm.startswith("capture")
        with collector.capture(0 if due else 1):
            model(input_ids=ids, labels=ids).loss.backward()
        if due and not collector.result():
            raise RuntimeError("the capture step recorded no statistics")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _memory_preset(args: argparse.Namespace) -> tuple[str, dict]:
    # --quick: the 0.1B shapes (hidden 512) cut to a few layers; otherwise the preset itself
    return ("0.1B" if args.quick else args.preset), {"layers": args.mem_layers}


def memory_probe(args: argparse.Namespace) -> None:
    """Child process (CPU): one warm normal step (optimiser state exists), then one step of ARM; print peak RSS."""
    seq_len, arm = int(args._memory_probe[0]), args._memory_probe[1]
    name, overrides = _memory_preset(args)
    model, optimizer, collector, vocab = _build(
        name, seq_len, torch.device("cpu"), torch.float32, args.attn_implementation, **overrides
    )
    ids = torch.randint(0, vocab, (args.mem_batch, seq_len), generator=torch.Generator().manual_seed(1))
    _step(model, optimizer, collector, ids, "none")
    _step(model, optimizer, collector, ids, arm)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def measure_memory(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    results = {}
    name, overrides = _memory_preset(args)
    if device.type == "cuda":  # one model for every T (RoPE takes any length): only the activations differ
        model, optimizer, collector, vocab = _build(
            name, max(args.seq_lens), device, dtype, args.attn_implementation, **overrides
        )
    for seq_len in args.seq_lens:
        peaks = {}
        if device.type == "cuda":
            ids = torch.randint(0, vocab, (args.mem_batch, seq_len), generator=torch.Generator().manual_seed(1))
            _step(model, optimizer, collector, ids.to(device), "none")  # optimiser state exists from here on
            for arm in ("normal", "capture"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                _step(model, optimizer, collector, ids.to(device), "none" if arm == "normal" else arm)
                sync(device)
                peaks[arm] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            for arm in ("normal", "capture"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--preset", args.preset,
                       "--mem_batch", str(args.mem_batch), "--mem_layers", str(args.mem_layers),
                       "--attn_implementation", args.attn_implementation,
                       "--_memory_probe", str(seq_len), "none" if arm == "normal" else arm]  # fmt: skip
                if args.quick:
                    cmd.append("--quick")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory probe T={seq_len} {arm} failed:\n{proc.stderr[-2000:]}")
                peaks[arm] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        results[str(seq_len)] = {
            "normal_mb": peaks["normal"],
            "capture_mb": peaks["capture"],
            "ratio": peaks["capture"] / peaks["normal"],
            "extra_mb": peaks["capture"] - peaks["normal"],
        }
        r = results[str(seq_len)]
        print(f"T={seq_len:>5}: normal {r['normal_mb']:.1f} MB, capture {r['capture_mb']:.1f} MB, "
              f"ratio {r['ratio']:.3f}, extra {r['extra_mb']:+.1f} MB", flush=True)  # fmt: skip
    return results


def measure_time(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict, float]:
    model, optimizer, collector, vocab = _build(
        args.timing_preset, args.seq_len, device, dtype, args.attn_implementation
    )
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    no_qr = StatsCollector(model, every=COLLECT_EVERY, distributed=False, quant_readiness=False)

    def timed(arm: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        _step(model, optimizer, no_qr if arm == "capture_no_qr" else collector, ids, arm)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for arm in ARMS:
            timed(arm)
    for i in range(args.steps):
        for k in range(len(ARMS)):  # rotate the order so that each arm runs first, second and third alike
            arm = ARMS[(i + k) % len(ARMS)]
            times[arm].append(timed(arm))
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    # Per round, each arm against the no-collector step of the same round: drifts over the run cancel out.
    paired = {arm: statistics.median(a / n for a, n in zip(times[arm], times["none"], strict=True)) for arm in ARMS[1:]}
    paired["qr"] = statistics.median(a / b for a, b in zip(times["capture"], times["capture_no_qr"], strict=True))
    return medians, paired, idle_call_s(collector)


def idle_call_s(collector: StatsCollector, calls: int = 20000) -> float:
    """Seconds per ``capture(step)`` of a step that is not due: all an idle collector adds to a training step, since
    it installs no hooks (``tests/test_stats_collector.py``). Timed over many calls, far below the step-time noise."""
    t0 = time.perf_counter()
    for _ in range(calls):
        with collector.capture(1):  # every=1000: step 1 is not due
            pass
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._memory_probe is not None:
        memory_probe(args)
        return None
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    medians, paired, idle_call = measure_time(args, device, dtype)  # its model is freed before the memory cells
    if device.type == "cuda":
        torch.cuda.empty_cache()
    none, idle, capture = medians["none"], medians["idle"], medians["capture"]
    for arm in ARMS:
        print(f"{arm:>8}: median step {medians[arm]:.4f} s ({medians[arm] / none:.4f}x no collector)", flush=True)
    print(f"idle capture() call: {idle_call * 1e6:.2f} us = {idle_call / none:.2e} of a step; paired medians: "
          f"idle {paired['idle']:.4f}x, capture {paired['capture']:.4f}x", flush=True)  # fmt: skip
    qr_ratio = {"median": capture / medians["capture_no_qr"], "paired": paired.pop("qr")}
    print(f"qr/ statistics: capture step with / without them {qr_ratio['median']:.4f}x (paired "
          f"{qr_ratio['paired']:.4f}x)", flush=True)  # fmt: skip
    amortised = {str(e): ((e - 1) * idle + capture) / (e * none) for e in EVERY}
    # The same from the direct idle cost: the idle steps cost none + idle_call each.
    amortised_direct = {str(e): ((e - 1) * (none + idle_call) + capture) / (e * none) for e in EVERY}
    print("amortised: " + ", ".join(f"every={e} {r:.4f}x" for e, r in amortised.items()), flush=True)

    memory = measure_memory(args, device, dtype)
    lens = sorted(memory, key=int)
    first = memory[lens[0]]["extra_mb"]
    # extra(T) / extra(T0) against T / T0: about T / T0 when linear, (T / T0)^2 when quadratic
    growth = {t: (memory[t]["extra_mb"] / first if first > 0 else None) for t in lens}

    mem_name, mem_over = _memory_preset(args)
    mem_preset = PRESETS[mem_name].with_overrides(**mem_over)
    result = {
        "benchmark": "collector_overhead",
        "median_step_s": medians,
        "ratio_idle": idle / none,
        "ratio_capture": capture / none,
        "ratio_capture_no_qr": medians["capture_no_qr"] / none,
        "qr_ratio": qr_ratio,
        "amortised": amortised,
        "idle_call_s": idle_call,
        "ratio_idle_direct": (none + idle_call) / none,
        "amortised_direct": amortised_direct,
        "paired_ratio": paired,
        "memory": memory,
        "memory_extra_growth": growth,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS, fresh process per cell",
        "memory_model": {"layers": mem_preset.layers, "hidden": mem_preset.hidden, "batch": args.mem_batch},
        **machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.timing_preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "timed_steps_per_arm": args.steps,
        "attn_implementation": args.attn_implementation,
        "wall_s": time.perf_counter() - t_start,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
