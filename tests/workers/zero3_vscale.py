"""Worker for tests/test_zero3.py: V-scale on a tiny Llama under ZeRO-3, started on 2 ranks by the deepspeed launcher.

Every rank runs the whole scenario and writes what it observed to ``<out>/rank<R>.json``; the test makes the
assertions, so a failure there shows the observed values instead of a bare launcher exit code. Rank 0 also computes
a single-process reference (same weights, no ZeRO, no DeepSpeed) for the loss and theta's gradient.

    deepspeed --num_gpus 2 tests/workers/zero3_vscale.py --out DIR
"""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from transformers import LlamaConfig, LlamaForCausalLM

import vscale_plugin as vsp
from vscale_plugin.testing.distributed import engine_config, gathered, worker_main

LR = 1e-2
MICRO_BATCH = 2
SEQ_LEN = 16
VOCAB = 128
NUM_KV_HEADS = 2


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def thetas(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "vscale" in n]


def zero3_model(cfg: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = LlamaForCausalLM(llama_config())
    # Under zero.Init transformers' own N(0, 0.02) init meets already-partitioned (empty) tensors and the model
    # keeps PyTorch's default init, under which phi is ~1 and V-scale barely matters. Re-initialise as the paper
    # does (sigma = 0.02, so phi ~ 1/2) on rank 0; GatheredParameters hands rank 0's values to every rank.
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            for w in weights:
                w.normal_(0.0, 0.02)
    return vsp.apply_vscale(model)


def make_engine(cfg: dict, seed: int):
    model = zero3_model(cfg, seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def batch(seed: int) -> torch.Tensor:
    # The same batch on every rank: the data-parallel mean gradient then equals the single-process gradient.
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ_LEN), generator=gen)


@torch.no_grad()
def eval_loss(engine, ids: torch.Tensor) -> float:
    engine.eval()
    loss = engine(input_ids=ids, labels=ids).loss.item()
    engine.train()
    return loss


def train_step(engine, ids: torch.Tensor) -> float:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def param_info(p: torch.nn.Parameter) -> dict:
    return {
        "has_ds_id": hasattr(p, "ds_id"),
        "ds_shape": list(getattr(p, "ds_shape", ())),
        "ds_numel": int(getattr(p, "ds_numel", -1)),
        "local_numel": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else -1,
        "data_numel": int(p.data.numel()),
        "ds_status": str(getattr(p, "ds_status", None)),
    }


def reference(full_weights: dict[str, torch.Tensor], ids: torch.Tensor) -> dict:
    """Loss and theta gradients of the same model and batch in one process, without ZeRO or DeepSpeed."""
    model = vsp.apply_vscale(LlamaForCausalLM(llama_config()))
    params = dict(model.named_parameters())
    assert set(params) == set(full_weights), sorted(set(params) ^ set(full_weights))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(full_weights[name])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {
        "loss": loss.item(),
        "theta_grads": {n: p.grad.tolist() for n, p in thetas(model)},
    }
    # The same weights without V-scale must give another loss, else the comparison above proves nothing about
    # V-scale being active under ZeRO-3.
    with torch.no_grad():
        out["loss_without_vscale"] = vsp.remove_vscale(model)(input_ids=ids, labels=ids).loss.item()
    return out


def work(out: Path, rank: int, world: int) -> dict:
    # stage3_param_persistence_threshold 0 makes even theta (2 elements) be fetched and released around every use, so
    # the test exercises ZeRO-3's gathering of a parameter that lives in a module called from a forward hook.
    cfg = engine_config(3, MICRO_BATCH, world, lr=LR, clip=1.0, stage3_param_persistence_threshold=0)
    res: dict = {}

    engine = make_engine(cfg, seed=0)
    named = thetas(engine.module)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    res["theta_names"] = names
    res["theta_info_after_initialize"] = [param_info(p) for p in params]
    res["theta_initial"] = gathered(params)

    # Full weights as the single-process reference will see them (a collective, so every rank joins).
    all_named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in all_named]):
        full_weights = {n: p.detach().clone() for n, p in all_named} if rank == 0 else {}

    ids = batch(seed=1)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    res["loss"] = loss.item()
    grads = [safe_get_full_grad(p) for p in params]
    res["theta_grads"] = {n: (g.tolist() if g is not None else None) for n, g in zip(names, grads, strict=True)}
    engine.step()
    res["theta_after_step"] = gathered(params)
    res["theta_info_after_step"] = [param_info(p) for p in params]

    if rank == 0:
        res["reference"] = reference(full_weights, ids)

    # Checkpoint round trip into a differently seeded model, so that nothing matches unless the load restores it.
    ckpt = out / "ckpt"
    fixed = batch(seed=2)
    res["eval_loss_before_save"] = eval_loss(engine, fixed)
    engine.save_checkpoint(str(ckpt), tag="step1")
    res["theta_saved"] = gathered(params)

    engine2 = make_engine(cfg, seed=123)
    params2 = [p for _, p in thetas(engine2.module)]
    res["theta_names_fresh"] = [n for n, _ in thetas(engine2.module)]
    res["theta_fresh"] = gathered(params2)
    res["eval_loss_fresh"] = eval_loss(engine2, fixed)
    load_path, _ = engine2.load_checkpoint(str(ckpt), tag="step1")
    res["load_path"] = load_path
    res["theta_loaded"] = gathered(params2)
    res["eval_loss_loaded"] = eval_loss(engine2, fixed)

    # One more identical step on both engines: equal only if the optimizer state (Adam moments) came back too.
    res["train_loss_step2"] = train_step(engine, fixed)
    res["train_loss_step2_loaded"] = train_step(engine2, fixed)
    res["theta_step2"] = gathered(params)
    res["theta_step2_loaded"] = gathered(params2)

    # V-scale must refuse a module that deepspeed.initialize already owns.
    refusals = {}
    for label, target in (("engine.module", engine.module), ("engine", engine)):
        try:
            vsp.apply_vscale(target)
        except RuntimeError as exc:
            refusals[label] = str(exc)
        else:
            refusals[label] = None
    res["refusals"] = refusals
    res["value_hooks_per_layer"] = [
        sum(isinstance(h, vsp.hf.patch.ValueHook) for h in layer.self_attn.v_proj._forward_hooks.values())
        for layer in engine.module.model.layers
    ]

    res["all_finite"] = all(math.isfinite(x) for v in res["theta_after_step"] for x in v)
    return res


if __name__ == "__main__":
    worker_main(work)
