"""2 ranks: the statistics under DeepSpeed Ulysses sequence parallelism (SP 2) against the same model without it.

Without SP the 2 ranks are data-parallel and both see the same batch (the optimisation of one rank). With SP both
ranks hold halves of the same batch (DeepSpeed's UlyssesSPDataLoaderAdapter), the loss combined over the SP group by
vscale_plugin.hf.sequence_parallel.sequence_parallel_loss. Steps go over batches b0, b1, b0; a StatsCollector on the
engine captures every step (step 1 with distributed=False: over the SP group only). Records per-step losses and
statistics, and the collector's refusals of the model without its engine and of a padded batch. VSP_ZERO_STAGE
picks the ZeRO stage (default 1), VSP_ARCH the architecture (default llama; sliding windows off: under sdpa Ulysses
drops them with the mask, which check_sequence_parallel refuses).

    deepspeed --num_gpus 2 tests/workers/sp_statistics.py --out DIR   (written: DIR/rank{R}.json)
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch

import vscale_plugin as vsp
from vscale_plugin.hf.sequence_parallel import check_sequence_parallel
from vscale_plugin.testing.distributed import UlyssesRun, engine_config, worker_main
from vscale_plugin.testing.models import randomise_theta, tiny_model

STEPS = 3
LR = 1e-2
T = 48  # shards of 24: positions 0..23 on rank 0, 24..47 on rank 1 (the profiles reach position 47, R_GS 31)
SP = 2
STAGE = int(os.environ.get("VSP_ZERO_STAGE", "1"))
ARCH = os.environ.get("VSP_ARCH", "llama")
NO_WINDOW = {"qwen2": {"use_sliding_window": False}, "qwen3": {"use_sliding_window": False}}


def batch(index: int) -> torch.Tensor:
    return torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(10 + index))


def train(sp: bool, rank: int) -> dict:
    model = randomise_theta(vsp.apply_vscale(tiny_model(ARCH, attn_implementation="sdpa", **NO_WINDOW.get(ARCH, {}))))
    if sp:
        check_sequence_parallel(model, SP, "sdpa", world_size=2)
        rows = [{"input_ids": r, "position_ids": torch.arange(T), "labels": r} for r in batch(rank)] * 2
        run = UlyssesRun(model, SP, STAGE, rows, rank, micro_batch=2, lr=LR)
        engine = run.engine
    else:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=engine_config(STAGE, 2, 2, lr=LR)
        )
    collector = vsp.StatsCollector(engine, every=1)
    local = vsp.StatsCollector(engine, every=1, distributed=False)
    out: dict = {"losses": [], "stats": []}
    for step in range(STEPS):
        used = local if step == 1 else collector
        with used.capture(step):
            if sp:
                loss = run.loss()
            else:
                ids = batch(step % 2)
                loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
        engine.step()
        out["losses"].append(loss.item())
        out["stats"].append(used.result())
    if sp:
        try:
            vsp.StatsCollector(engine.module)
        except NotImplementedError as err:
            out["bare_model_error"] = str(err)
        ids = run.inputs["input_ids"]
        mask = torch.ones_like(ids)
        mask[:, -2:] = 0  # each rank's shard ends in pads
        try:
            with collector.capture(STEPS):
                engine(input_ids=ids, position_ids=run.inputs["position_ids"], attention_mask=mask, use_cache=False)
        except ValueError as err:
            out["padded_error"] = str(err)
    return out


def work(out: Path, rank: int, world: int) -> dict:
    # The plain run first: registering Ulysses replaces transformers' sdpa function in this process.
    return {"plain": train(sp=False, rank=rank), "sp": train(sp=True, rank=rank)}


if __name__ == "__main__":
    worker_main(work)
