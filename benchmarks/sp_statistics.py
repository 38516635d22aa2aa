"""What a statistics capture step costs per rank under DeepSpeed Ulysses sequence parallelism (SP 2), against T.

    python benchmarks/sp_statistics.py --device cpu --quick        # 2 CPU ranks over gloo, T = 512..4096, minutes
    python benchmarks/sp_statistics.py --device cuda               # 2 GPUs over nccl, bf16

The script starts itself on 2 ranks through the ``deepspeed`` launcher (``--num_gpus 2``: on a host without GPUs
DeepSpeed's CPU accelerator, gloo). A small V-scale Llama (sdpa) is registered with Ulysses SP 2 as
``tests/workers/sp_statistics.py`` does it; each rank holds T/2 positions of one sequence (DeepSpeed's
UlyssesSPDataLoaderAdapter), the loss combined over the SP group. A capture step is a full training step (forward,
backward, optimiser step) with a due ``StatsCollector(engine)`` around forward and backward; a normal step has no
collector. For the sink statistics the collector all-to-alls q and k to whole sequences of the rank's heads and
chunks the queries (``sinks.sink_column``), so the claim measured here is that its extra memory and time stay O(T)
per rank: no T x T matrix.

Per ``--seq_lens`` T and per rank: the median step time of normal and capture steps (interleaved, the order
alternating, after warm-up) and their ratio (``ratio``: median over median; ``paired``: median of per-round
ratios); the peak memory of a normal and a capture step and ``extra_mb`` = capture - normal. On CUDA the peak is
``torch.cuda.max_memory_allocated`` (reset before each step), taken in the timing run. On CPU there is no allocator
peak, so, as ``benchmarks/collector_overhead.py`` does, each (T, arm) is a fresh 2-rank launch whose ranks do one
warm normal step (the optimiser state exists) and then one step of the arm, and read their process's peak RSS
(``ru_maxrss``, which never goes down within a process). ``extra_growth`` is extra(2T) / extra(T) between
consecutive lengths: about 2 when the statistics' memory is linear in T, about 4 when quadratic. The figures of the
rank with the larger value are reported (``per_rank`` has both). The last line printed is one JSON object.

``benchmarks/tp_statistics.py`` is the same measurement under DeepSpeed AutoTP (``tensor_parallel.autotp_size`` 2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import emit, machine

RANKS = 2
COLLECT_EVERY = 1000  # capture(0) is due
ARMS = ("normal", "capture")


def parse_args(argv: list[str] | None = None, mode: str = "sp") -> argparse.Namespace:
    doc = __doc__.split("\n\n")[0]
    if mode == "tp":
        doc = doc.replace("Ulysses sequence parallelism (SP 2)", "AutoTP (autotp_size 2)")
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 2 layers x hidden 128, 1 timed repeat fewer")
    p.add_argument("--seq_lens", type=int, nargs="+", default=None, help="default 512 1024 2048 4096 (x4 on cuda)")
    p.add_argument("--layers", type=int, default=None, help="default 2 with --quick, else 4")
    p.add_argument("--hidden", type=int, default=None, help="default 128 with --quick, else 512 (head_dim 32 / 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per arm and T (default 3 quick, 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm and T first")
    p.add_argument("--no_memory", action="store_true", help="CPU: skip the fresh-launch memory cells")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--timeout_s", type=float, default=1200, help="per launch of the 2 ranks")
    p.add_argument("--_rank", default=None, help=argparse.SUPPRESS)  # rank side: DIR[:T:ARM] (memory cell)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = p.parse_args(argv)
    args.mode = mode
    cuda = args.device == "cuda"
    args.seq_lens = args.seq_lens or ([2048, 4096, 8192, 16384] if cuda else [512, 1024, 2048, 4096])
    if any(t % RANKS for t in args.seq_lens):
        p.error(f"--seq_lens must be multiples of {RANKS}")
    args.layers = args.layers or (2 if args.quick else 4)
    args.hidden = args.hidden or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)
    if cuda and args._rank is None and torch.cuda.device_count() < RANKS:
        p.error(f"--device cuda needs {RANKS} GPUs, this host has {torch.cuda.device_count()}; use --device cpu")
    return args


# ---- the rank side ----


def _build(args: argparse.Namespace, rank: int):
    """The engine (SP or TP over both ranks), its collector and a batch maker ``inputs(T) -> dict``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    import vscale_plugin as vsp
    from vscale_plugin.testing.distributed import engine_config
    from vscale_plugin.train.recipe import PRESETS, llama_config

    heads = 4 if args.hidden <= 256 else 8
    preset = PRESETS["smoke"].with_overrides(
        layers=args.layers, hidden=args.hidden, heads=heads, kv_heads=heads // 2, head_dim=args.hidden // heads,
        mlp=args.hidden * 11 // 4, seq_len=max(args.seq_lens),
    )  # fmt: skip
    vocab = 4096
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_config(llama_config(preset, vocab, eos_token_id=0), attn_implementation="sdpa")
    model = vsp.apply_vscale(model)
    device = get_accelerator().current_device_name()
    config = engine_config(1, 1, 1, lr=1e-4)  # one data-parallel replica of the 2 ranks
    if cuda:
        config["bf16"] = {"enabled": True}
    mpu = None
    if args.mode == "sp":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        from vscale_plugin.hf.sequence_parallel import check_sequence_parallel

        check_sequence_parallel(model, RANKS, "sdpa", world_size=RANKS)
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, "sdpa", RANKS, micro_batch_size=1, seq_length=max(args.seq_lens), seq_length_is_variable=True
        )
    else:
        config["tensor_parallel"] = {"autotp_size": RANKS}
        del config["train_batch_size"]  # DeepSpeed derives it under TP
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    collector = vsp.StatsCollector(engine, every=COLLECT_EVERY)

    def inputs(seq_len: int) -> dict:
        ids = torch.randint(3, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
        if args.mode != "sp":
            return {"input_ids": ids.to(device), "labels": ids.to(device)}
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        rows = [{"input_ids": ids[0], "position_ids": torch.arange(seq_len), "labels": ids[0]}]
        loader = UlyssesSPDataLoaderAdapter(
            torch.utils.data.DataLoader(rows, batch_size=1),
            sp_rank=rank,
            sp_group=mpu.get_sequence_parallel_group(),
            sp_world_size=RANKS,
            device=device,
        )
        shard = {k: v.contiguous() for k, v in next(iter(loader)).items()}
        return {"input_ids": shard["input_ids"], "position_ids": shard["position_ids"], "labels": shard["shift_labels"],
                "shift_labels": shard["shift_labels"], "sp_group": mpu.get_sequence_parallel_group()}  # fmt: skip

    return engine, collector, inputs


def _step(engine, collector, batch: dict, arm: str) -> None:
    """One full training step; under capture, forward and backward inside it (the collector reads the gradients)."""
    import contextlib

    from vscale_plugin.hf.sequence_parallel import sequence_parallel_loss

    batch = dict(batch)
    group = batch.pop("sp_group", None)
    with collector.capture(0) if arm == "capture" else contextlib.nullcontext():
        loss = engine(**batch, use_cache=False).loss
        if group is not None:
            loss = sequence_parallel_loss(loss, batch["shift_labels"], group, zero_stage=1)
        engine.backward(loss)
    engine.step()
    if arm == "capture" and not collector.result():
        raise RuntimeError("the capture step recorded no statistics")


def _timed(engine, collector, batch: dict, arm: str, cuda: bool) -> tuple[float, float | None]:
    import torch.distributed as dist

    dist.barrier()  # both ranks start together: each step's collectives wait for the slower one anyway
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _step(engine, collector, batch, arm)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return elapsed, (torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def rank_timing(args: argparse.Namespace, rank: int) -> dict:
    cuda = args.device == "cuda"
    engine, collector, inputs = _build(args, rank)
    out = {}
    for seq_len in args.seq_lens:
        batch = inputs(seq_len)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        peaks: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(args.warmup):
            for arm in ARMS:
                _timed(engine, collector, batch, arm, cuda)
        for i in range(args.repeats):
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:  # each arm first in every other round
                elapsed, peak = _timed(engine, collector, batch, arm, cuda)
                times[arm].append(elapsed)
                if peak is not None:
                    peaks[arm].append(peak)
        cell = {
            "median_step_s": {arm: statistics.median(t) for arm, t in times.items()},
            "paired": statistics.median(c / n for c, n in zip(times["capture"], times["normal"], strict=True)),
            "tokens_per_rank": int(batch["input_ids"].shape[1]),
        }
        if cuda:
            cell["peak_mb"] = {arm: max(p) for arm, p in peaks.items()}
        out[str(seq_len)] = cell
    return out


def rank_memory(args: argparse.Namespace, rank: int, seq_len: int, arm: str) -> dict:
    """One memory cell (CPU): a warm normal step, then one step of ``arm``; the process's peak RSS."""
    engine, collector, inputs = _build(args, rank)
    batch = inputs(seq_len)
    _step(engine, collector, batch, "normal")
    _step(engine, collector, batch, arm)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rank_main(args: argparse.Namespace) -> None:
    from vscale_plugin.launch.distributed import distributed, exit_after_distributed

    target, *cell = args._rank.split(":")
    with distributed() as (rank, _world):
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        result = rank_memory(args, rank, int(cell[0]), cell[1]) if cell else rank_timing(args, rank)
        dist.barrier()
        (Path(target) / f"rank{rank}.json").write_text(json.dumps(result))
    exit_after_distributed(0)


# ---- the launching side ----


def _launch(args: argparse.Namespace, script: Path, work: Path, cell: str = "") -> list[dict]:
    from vscale_plugin.testing.distributed import run_deepspeed

    work.mkdir(parents=True, exist_ok=True)
    flags = ["--device", args.device, "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seq_lens", *map(str, args.seq_lens),
             "--_rank", f"{work}{cell}"]  # fmt: skip
    run_deepspeed(script, *flags, num_gpus=RANKS, timeout=args.timeout_s)
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(RANKS)]


def main(argv: list[str] | None = None, mode: str = "sp", script: Path | None = None) -> dict | None:
    args = parse_args(argv, mode)
    if args._rank is not None:
        rank_main(args)
        return None
    script = script or Path(__file__).resolve()
    cuda = args.device == "cuda"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"vsp-{mode}-bench-") as tmp:
        timing = _launch(args, script, Path(tmp) / "timing")
        memory_ranks: list[dict] = [{} for _ in range(RANKS)]
        if cuda:
            for r in range(RANKS):
                memory_ranks[r] = {t: timing[r][t]["peak_mb"] for t in timing[r]}
        elif not args.no_memory:
            for seq_len in args.seq_lens:
                for arm in ARMS:
                    cells = _launch(args, script, Path(tmp) / f"mem-{seq_len}-{arm}", f":{seq_len}:{arm}")
                    for r in range(RANKS):
                        memory_ranks[r].setdefault(str(seq_len), {})[arm] = cells[r]["peak_rss_mb"]
                    print(f"T={seq_len} {arm}: peak RSS per rank "
                          f"{[round(c['peak_rss_mb'], 1) for c in cells]} MB", flush=True)  # fmt: skip
    per_rank = []
    for r in range(RANKS):
        cells = {}
        for t, cell in timing[r].items():
            med = cell["median_step_s"]
            cells[t] = {"median_step_s": med, "ratio": med["capture"] / med["normal"], "paired": cell["paired"],
                        "tokens_per_rank": cell["tokens_per_rank"]}  # fmt: skip
            if t in memory_ranks[r]:
                peaks = memory_ranks[r][t]
                cells[t].update(normal_mb=peaks["normal"], capture_mb=peaks["capture"],
                                extra_mb=peaks["capture"] - peaks["normal"])  # fmt: skip
        per_rank.append(cells)
    lens = [str(t) for t in args.seq_lens]
    table = {}
    for t in lens:
        worst = max(per_rank, key=lambda cells: cells[t]["ratio"])[t]  # the slower rank's ratio (they wait for it)
        row = {"ratio": worst["ratio"], "paired": worst["paired"], "median_step_s": worst["median_step_s"],
               "tokens_per_rank": worst["tokens_per_rank"]}  # fmt: skip
        if "extra_mb" in per_rank[0][t]:
            big = max(per_rank, key=lambda cells: cells[t]["extra_mb"])[t]
            row.update(normal_mb=big["normal_mb"], capture_mb=big["capture_mb"], extra_mb=big["extra_mb"])
        table[t] = row
    growth = {}
    for prev, cur in itertools.pairwise(lens):
        if "extra_mb" in table[cur] and table[prev]["extra_mb"] > 0:
            growth[cur] = table[cur]["extra_mb"] / table[prev]["extra_mb"]
        else:
            growth[cur] = None
    for t in lens:
        row = table[t]
        mem = ""
        if "extra_mb" in row:
            mem = f", normal {row['normal_mb']:.1f} MB, capture {row['capture_mb']:.1f} MB"
            mem += f", extra {row['extra_mb']:+.1f} MB"
        print(
            f"T={t:>6} ({row['tokens_per_rank']} per rank): normal {row['median_step_s']['normal']:.4f} s, "
            f"capture {row['median_step_s']['capture']:.4f} s, ratio {row['ratio']:.3f} (paired "
            f"{row['paired']:.3f}){mem}" + (f", growth {growth[t]:.2f}" if growth.get(t) else ""),
            flush=True,
        )
    result = {
        "benchmark": f"{mode}_statistics",
        "parallelism": {"sp": {"ulysses_sp_size": RANKS}, "tp": {"autotp_size": RANKS}}[mode],
        "ranks": RANKS,
        "seq_lens": args.seq_lens,
        "results": table,
        "extra_growth": growth,
        "per_rank": per_rank,
        "memory_method": "cuda max_memory_allocated per step"
        if cuda
        else ("none (--no_memory)" if args.no_memory else "peak RSS, fresh 2-rank launch per (T, arm)"),
        "model": {"layers": args.layers, "hidden": args.hidden, "attn_implementation": "sdpa", "batch": 1},
        "repeats": args.repeats,
        "warmup": args.warmup,
        **machine(torch.device(args.device)),
        "backend": "nccl" if cuda else "gloo",
        "dtype": "bfloat16" if cuda else "float32",
        "wall_s": time.perf_counter() - t_start,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
