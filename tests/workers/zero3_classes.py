"""Worker for tests/test_hf_classes.py: ``patch_model_classes`` under ZeRO-3's ``HfDeepSpeedConfig``, on 2 ranks.

With the classes patched and an ``HfDeepSpeedConfig`` alive, transformers builds every model inside
``deepspeed.zero.Init``; theta must be created there, partitioned, initialised (plain checkpoint) or loaded (V-scale
checkpoint), and trained. Every rank writes what it saw to ``<out>/rank<R>.json``; the test asserts.

    deepspeed --num_gpus 2 tests/workers/zero3_classes.py --out DIR
"""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import vscale_plugin as vsp
from vscale_plugin.testing.distributed import engine_config, gathered, worker_main
from vscale_plugin.testing.models import randomise_theta, tiny_config, tiny_model

LR = 1e-2
MICRO_BATCH = 2
SEQ_LEN = 16


def thetas(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".vscale.theta" in n]


def theta_info(model: torch.nn.Module) -> list[dict]:
    return [
        {"has_ds_id": hasattr(p, "ds_id"), "local_numel": int(p.ds_tensor.numel()), "data_numel": int(p.data.numel())}
        for p in thetas(model)
    ]


def observe(model: torch.nn.Module) -> dict:
    return {
        "vscaled": vsp.is_vscaled(model),
        "config_vscale": model.config.vscale,
        "theta_info": theta_info(model),
        "theta": gathered(thetas(model)),
    }


def work(out: Path, rank: int, world: int) -> dict:
    cfg = engine_config(3, MICRO_BATCH, world, stage3_param_persistence_threshold=0)
    res: dict = {}
    plain_dir, vscale_dir = out / "plain", out / "vscaled"
    if rank == 0:  # written before ZeRO-3 is switched on: ordinary single-process models
        tiny_model("llama").save_pretrained(plain_dir)
        randomise_theta(vsp.apply_vscale(tiny_model("llama"))).save_pretrained(vscale_dir)
    dist.barrier()
    plain_reference = tiny_model("llama")
    res["expected_no_decay"] = vsp.no_decay_parameter_names(vsp.apply_vscale(tiny_model("llama")))
    res["saved_theta"] = [p.tolist() for p in thetas(vsp.from_pretrained(vscale_dir))]

    dschf = HfDeepSpeedConfig(cfg)  # noqa: F841 - transformers reads ZeRO-3 from it while it is alive
    with vsp.patch_model_classes():
        from_config = AutoModelForCausalLM.from_config(tiny_config("llama"))
        from_plain = AutoModelForCausalLM.from_pretrained(plain_dir)
        from_vscaled = AutoModelForCausalLM.from_pretrained(vscale_dir)
    res["from_config"] = observe(from_config)
    res["from_plain"] = observe(from_plain)
    res["from_vscaled"] = observe(from_vscaled)
    # The plain checkpoint's own weights came in too (gathered, compared with the unsharded model on every rank).
    named = dict(from_plain.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values())):
        res["plain_weights_equal"] = all(
            torch.equal(named[n].detach(), p.detach()) for n, p in plain_reference.named_parameters()
        )
    res["no_decay"] = vsp.no_decay_parameter_names(from_plain)

    groups = vsp.decay_parameter_groups(from_plain, 0.1)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    engine, *_ = deepspeed.initialize(model=from_plain, optimizer=optimizer, config=cfg)
    ids = torch.randint(0, 128, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    res["losses"] = losses
    res["theta_after_training"] = gathered(thetas(engine.module))
    res["all_finite"] = all(math.isfinite(x) for v in res["theta_after_training"] for x in v)
    return res


if __name__ == "__main__":
    worker_main(work)
