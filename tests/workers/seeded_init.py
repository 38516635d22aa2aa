"""Worker for tests/test_init_across_zero.py: the launcher's model build (``train.model.build_model`` from the
launcher's own flags) under ZeRO 0, 1, 2 and 3, on however many ranks the deepspeed launcher starts.

Every rank builds the smoke preset's model (learned V-scale, ``--seed 0``) once per stage, gathers its full state
(ZeRO-3: all partitions) and writes a SHA-256 of every tensor's float32 bytes to ``<out>/rank<R>.json``, with theta's
values, whether the ZeRO-3 parameters really were partitions, and the digests of a ``--seed 1`` model; the test
compares them across stages, ranks and world sizes.

    deepspeed --num_gpus N tests/workers/seeded_init.py --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from vscale_plugin.data import Tokenizer
from vscale_plugin.launch.distributed import distributed, exit_after_distributed
from vscale_plugin.train.cli import build_config, parse_args
from vscale_plugin.train.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
STAGES = (0, 1, 2, 3)


def ds_config_file(stage: int, out: Path) -> Path:
    """The shipped config of ``stage``; stage 0 (plain data parallelism) has none, so zero1.json with stage 0."""
    if stage:
        return CONFIGS / f"zero{stage}.json"
    config = json.loads((CONFIGS / "zero1.json").read_text())
    config["zero_optimization"]["stage"] = 0
    path = out / f"zero0_rank{dist.get_rank()}.json"
    path.write_text(json.dumps(config))
    return path


def digests(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, list[float]], bool]:
    """(name -> SHA-256 of the full tensor as float32, theta values, all ZeRO parameters were partitions)."""
    params = dict(model.named_parameters())
    partitioned = all(p.data.numel() == 0 for p in params.values() if hasattr(p, "ds_id"))
    with deepspeed.zero.GatheredParameters(list(params.values())):  # a no-op for a model without ZeRO-3
        full = {name: p.detach().float().contiguous() for name, p in params.items()}
        sums = {name: hashlib.sha256(t.numpy().tobytes()).hexdigest() for name, t in full.items()}
        thetas = {name: t.tolist() for name, t in full.items() if "vscale" in name}
    return sums, thetas, partitioned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    with distributed() as (rank, world_size):
        # The model reads only the vocabulary's facts from the tokenizer; no text is encoded here.
        tokenizer = Tokenizer("smoke-sized", vocab_size=4096, eos_id=1, encode_batch=lambda texts: [[] for _ in texts])
        result: dict = {"rank": rank, "world_size": world_size, "stages": {}}
        for stage in STAGES:
            for seed in (0, 1):
                flags = ["--ds_config", str(ds_config_file(stage, args.out)), "--preset", "smoke", "--seed", str(seed),
                         "--micro_batch", "1", "--global_batch", str(world_size),
                         "--save_dir", str(args.out / f"unused-save-dir-{stage}")]  # fmt: skip
                config = build_config(parse_args(flags), world_size)
                model = build_model(config, tokenizer)
                sums, thetas, partitioned = digests(model)
                entry = result["stages"].setdefault(str(stage), {"zero_stage": config.zero_stage})
                entry["digests" if seed == 0 else "digests_seed1"] = sums
                if seed == 0:
                    entry.update(thetas=thetas, partitioned=partitioned)
                    entry["zero3_params"] = sum(hasattr(p, "ds_id") for p in model.parameters())
                del model
        (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
    exit_after_distributed(0)


if __name__ == "__main__":
    main()
