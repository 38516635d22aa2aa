"""2 ranks: V-scale under DeepSpeed Ulysses sequence parallelism (SP 2) against the same model without it.

Without SP the 2 ranks are data-parallel and both see the same batch, so their mean gradient is that batch's own: the
optimisation of one rank. Steps go over batches b0, b1, b0. With SP, rank r's data loader yields b_r and DeepSpeed's
UlyssesSPDataLoaderAdapter hands both ranks the shards of rank 0's batch, then of rank 1's, ...: the same b0, b1, b0,
each rank holding 8 of the 16 positions. The loss is combined over the SP group with
vscale_plugin.hf.sequence_parallel.sequence_parallel_loss. Both runs use sdpa and DeepSpeed's own optimiser.

Records per-step losses, theta (its gradient after the first backward, its values after the steps), and from the
first step: what forward hooks on layer 0's q/k/v_proj, attention module and decoder layer see, what the attention
kernel inside Ulysses gets, V-scale's calls and its output on v_proj, and the gradient of layer 0's output (the
residual stream). VSP_ZERO_STAGE picks the ZeRO stage (default 1).

    deepspeed --num_gpus 2 tests/workers/sequence_parallel.py --out DIR   (written: DIR/rank{R}.json)
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vscale_plugin as vsp
from vscale_plugin.hf.sequence_parallel import (
    check_sequence_parallel,
    check_sequence_parallel_batch,
    sequence_parallel_size,
)
from vscale_plugin.testing.distributed import UlyssesRun, engine_config, gathered, worker_main
from vscale_plugin.testing.models import randomise_theta, tiny_model

STEPS = 3
LR = 1e-2
T = 16
SP = 2
STAGE = int(os.environ.get("VSP_ZERO_STAGE", "1"))


def batch(index: int) -> torch.Tensor:
    return torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(10 + index))


def thetas(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.endswith(".vscale.theta")]


def shape(x):
    if torch.is_tensor(x):
        return list(x.shape)
    if isinstance(x, (tuple, list)):
        return [shape(y) for y in x]
    return None if x is None else type(x).__name__


class Recorder:
    """Forward hooks on layer 0's parts (first step only): shapes, position ids, V-scale's output, the residual
    stream's gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: dict = {"vscale_calls": 0}
        self.on = True
        layer = model.model.layers[0]
        attn = layer.self_attn
        for name, module in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj)):
            module.register_forward_hook(self._projection(name))
        attn.register_forward_hook(self._attention, with_kwargs=True)
        layer.register_forward_hook(self._layer, with_kwargs=True)
        for block in model.model.layers:
            block.self_attn.vscale.register_forward_hook(self._vscale)

    def _projection(self, name):
        def hook(module, args, output):
            if self.on:
                self.seen[name] = {"input": shape(args[0]), "output": shape(output)}
                if name == "v_proj":  # its hooks run in order: V-scale's (from apply_vscale) came first
                    self.seen["v_scaled"] = output.detach().tolist()

        return hook

    def _vscale(self, module, args, output):
        if self.on:
            self.seen["vscale_calls"] += 1
            self.seen["vscale_input"] = shape(args[0])

    def _attention(self, module, args, kwargs, output):
        if self.on:
            self.seen["attention"] = {
                "hidden_states": shape(kwargs.get("hidden_states", args[0] if args else None)),
                "position_ids": kwargs["position_ids"].tolist(),
                "position_embeddings": shape(kwargs["position_embeddings"]),
                "attention_mask": shape(kwargs.get("attention_mask")),
                "output": shape(output),
            }

    def _layer(self, module, args, kwargs, output):
        if self.on:
            hidden = output[0] if isinstance(output, tuple) else output
            self.seen["layer"] = {"input": shape(args[0] if args else kwargs["hidden_states"]), "output": shape(hidden)}
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self.seen.__setitem__("residual_grad", grad.tolist()))


def record_kernel(seen: dict) -> None:
    """Wrap the sdpa kernel (before Ulysses wraps it in turn) to record what it gets inside the all-to-alls."""
    kernel = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        seen.setdefault(
            "kernel",
            {
                "query": shape(query),
                "key": shape(key),
                "value": shape(value),
                "attention_mask": shape(attention_mask),
                "position_ids": kwargs["position_ids"].tolist() if "position_ids" in kwargs else None,
            },
        )
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = recording


def train(sp: bool, rank: int) -> dict:
    model = randomise_theta(vsp.apply_vscale(tiny_model("llama", attn_implementation="sdpa")))
    out: dict = {"losses": []}
    kernel: dict = {}
    if sp:
        check_sequence_parallel(model, SP, "sdpa", world_size=2)
        record_kernel(kernel)
        rows = [{"input_ids": r, "position_ids": torch.arange(T), "labels": r} for r in batch(rank)] * 2
        for row in rows[:2]:
            check_sequence_parallel_batch({k: v[None] for k, v in row.items()}, SP)
        run = UlyssesRun(model, SP, STAGE, rows, rank, micro_batch=2, lr=LR)  # one data-parallel replica of 2 SP ranks
        engine = run.engine
    else:
        config = engine_config(STAGE, 2, 2, lr=LR)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    recorder = Recorder(engine.module)
    for step in range(STEPS):
        if sp:
            loss = run.loss()
            out.setdefault("micro_batches", []).append({k: v.tolist() for k, v in run.inputs.items()})
        else:
            ids = batch(step % 2)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        recorder.on = False
        if step == 0:
            out["theta_grad"] = [safe_get_full_grad(p).tolist() for p in thetas(engine.module)]
        engine.step()
        out["losses"].append(loss.item())
    out["theta"] = gathered(thetas(engine.module))
    if sp:
        out["unchecked"] = unchecked_batches(engine, rank)
    out["seen"] = {**recorder.seen, **kernel}
    out["sequence_parallel_size"] = engine.sequence_parallel_size
    out["read_sp_size"] = [sequence_parallel_size(engine), sequence_parallel_size(engine.module)]
    out["seq_dp_world_size"] = engine.seq_dp_world_size
    out["dp_world_size"] = engine.dp_world_size
    return out


@torch.no_grad()
def unchecked_batches(engine, rank: int) -> dict:
    """What check_sequence_parallel_batch refuses, run anyway: logits without position_ids, and with a padding
    attention_mask, against those of the proper shard (max abs difference); Ulysses raises no error for either."""
    ids = batch(0)[:, rank * T // SP : (rank + 1) * T // SP]
    positions = torch.arange(rank * T // SP, (rank + 1) * T // SP).expand(2, -1)
    good = engine(input_ids=ids, position_ids=positions, use_cache=False).logits
    no_positions = engine(input_ids=ids, use_cache=False).logits
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1's first 3 tokens of this shard padded
    masked = engine(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
    return {
        "no_position_ids": (no_positions - good).abs().max().item(),
        "padding_mask": (masked - good).abs().max().item(),
    }


def work(out: Path, rank: int, world: int) -> dict:
    # The plain run first: registering Ulysses replaces transformers' sdpa function in this process.
    return {"plain": train(sp=False, rank=rank), "sp": train(sp=True, rank=rank)}


if __name__ == "__main__":
    worker_main(work)
