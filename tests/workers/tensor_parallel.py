"""2 ranks: V-scale under DeepSpeed AutoTP (autotp_size 2) against the same model without tensor parallelism.

Both ranks see the same batch. Without TP the 2 ranks are data-parallel over [batch, batch], whose mean gradient is
the batch's own: the same optimisation as one rank, with DeepSpeed's own optimiser in both runs. Records per-step
losses, theta (its gradient after the first backward, its values after the steps), which KV heads each rank's
v_proj computes, every step's statistics (StatsCollector on the engine; distributed=False under TP too: one model's
parts, combined over its TP group), DeepSpeed's checkpoint and both runs' full weights (DIR/plain.pt, DIR/tp.pt), and
AutoTP on a model whose single KV head cannot be split.

With VSP_ARCHITECTURES=a,b,... it runs instead, for each architecture, the run without TP and the TP run at ZeRO-1
and records their losses, theta and statistics (or the error that AutoTP or V-scale gave), in one launch.

    deepspeed --num_gpus 2 tests/workers/tensor_parallel.py --out DIR   (written: DIR/rank{R}.json)
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

import vscale_plugin as vsp
from vscale_plugin.hf.patch import ValueHook
from vscale_plugin.testing.distributed import engine_config, worker_main
from vscale_plugin.testing.models import randomise_theta, tiny_model

STEPS = 3
LR = 1e-2
STAGE = int(os.environ.get("VSP_ZERO_STAGE", "1"))
ARCHITECTURES = [name for name in os.environ.get("VSP_ARCHITECTURES", "").split(",") if name]


def batch() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def thetas(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.endswith(".vscale.theta")]


def train(tp: int, arch: str = "llama", **model_overrides) -> dict:
    model = randomise_theta(vsp.apply_vscale(tiny_model(arch, **model_overrides)))
    config = engine_config(STAGE, 2, 2 // tp, lr=LR)
    if tp > 1:
        config["tensor_parallel"] = {"autotp_size": tp}
        # DeepSpeed derives it: it counts TP ranks as data-parallel under ZeRO-1/2 but not under ZeRO-3.
        del config["train_batch_size"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = batch()
    out: dict = {"losses": [], "v_proj": type(engine.module.model.layers[0].self_attn.v_proj).__name__, "stats": []}
    out["stats_local"] = []
    collector = vsp.StatsCollector(engine, every=1)
    local = vsp.StatsCollector(engine, every=1, distributed=False)
    for step in range(STEPS):
        with (local if step == 1 else collector).capture(step):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
        if step == 0:
            out["theta_grad"] = [safe_get_full_grad(p).tolist() for p in thetas(engine.module)]
        engine.step()
        out["losses"].append(loss.item())
        out["stats"].append(collector.result() if step != 1 else {})
        out["stats_local"].append(local.result())
    out["theta"] = [p.detach().tolist() for p in thetas(engine.module)]
    out["shards"] = [
        [
            (hook.shard.start, hook.shard.count) if hook.shard else None
            for hook in layer.self_attn.v_proj._forward_hooks.values()
            if isinstance(hook, ValueHook)
        ]
        for layer in engine.module.model.layers
    ]
    return out, engine


def save_full_weights(engine, path: Path, rank: int) -> None:
    """The engine's weights as one model has them: gathered over the TP shards and ZeRO-3 partitions (a collective;
    DeepSpeed's save_16bit_model writes a TP rank's shard under ZeRO-1/2, hence its consolidation call here)."""
    if engine.zero_optimization_partition_weights() or engine.autotp_size() > 1:
        weights = engine._consolidated_16bit_state_dict()  # on rank 0; None elsewhere
    else:
        weights = engine.module.state_dict()
    if rank == 0:
        torch.save(weights, path)


def sweep(architectures: list[str]) -> dict:
    # Every run without TP first: DeepSpeed 0.19.8 cannot initialise an engine without TP in a process that made one
    # with it ("'NoneType' object has no attribute 'get_model_parallel_rank'").
    result: dict = {arch: {"plain": train(tp=1, arch=arch)[0]} for arch in architectures}
    for arch in architectures:
        try:
            result[arch]["tp"] = train(tp=2, arch=arch)[0]
        except Exception as err:  # the same on both ranks: raised before any collective of the step
            result[arch]["error"] = f"{type(err).__name__}: {err}"
    return result


def work(out: Path, rank: int, world: int) -> dict:
    if ARCHITECTURES:
        return sweep(ARCHITECTURES)
    result: dict = {}
    result["plain"], plain = train(tp=1)
    save_full_weights(plain, out / "plain.pt", rank)
    result["tp"], engine = train(tp=2)
    engine.save_checkpoint(str(out / "ckpt"), tag="t")
    save_full_weights(engine, out / "tp.pt", rank)
    try:
        train(tp=2, num_key_value_heads=1)
    except Exception as err:
        result["one_kv_head_error"] = f"{type(err).__name__}: {err}"
    return result


if __name__ == "__main__":
    worker_main(work)
