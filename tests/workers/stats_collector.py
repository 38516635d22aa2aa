"""Worker for tests/test_stats_distributed.py: StatsCollector on 2 ranks (CPU, gloo), started by the deepspeed launcher.

One launch runs every scenario and writes what each rank saw to ``<out>/rank<R>.json``; the test makes the assertions.

- ``reference`` (rank 0 only): ``vsp.measure`` of the model on the whole batch of 4 sequences in one process;
  ``per_sequence`` (rank 0): ``vsp.measure`` of each sequence alone (one forward call each, for the qr/ statistics
  that are averaged over calls).
- ``plain``: the same model as a plain module, data parallel by hand (rank r: sequences 2r, 2r+1), collected with
  ``StatsCollector(model, every=1)``; ``plain_local`` is the same half batch with ``distributed=False`` (what this
  rank alone sees, so that the test can show the aggregation matters).
- ``padded``: a padded batch (rows of 40..48 real tokens, left and right padded), half per rank with
  ``attention_mask``, plain module; ``padded_reference`` (rank 0) is ``vsp.measure`` of the whole padded batch. Both
  halves hold the same number of loss targets, so the mean of the ranks' mean losses is the whole batch's mean.
- ``stages[S]``: a DeepSpeed engine with ZeRO stage S, 2 micro-batches of 1 sequence per rank (rank r, micro-batch
  m: sequence 2r + m), gradient clipping 1e-3 (it binds), ``StatsCollector(engine, every=1)``; then one idle step
  with ``StatsCollector(engine, every=2).capture(1)``.

The model is a tiny V-scaled Llama (learned theta, randomised) with an attention sink planted in layer 0 for
sequences that start with BOS: sequences 0, 1, 2 do, 3 does not, so the two halves have different sink rates.

    deepspeed --num_gpus 2 tests/workers/stats_collector.py --out DIR
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

import vscale_plugin as vsp
from vscale_plugin.stats import causal_lm_labels
from vscale_plugin.testing.distributed import engine_config, worker_main
from vscale_plugin.testing.models import tiny_model

STAGES = (0, 1, 2, 3)
BATCH = 4
SEQ_LEN = 48
VOCAB = 128
BOS = 1
GAS = 2
CLIP = 1e-3  # far below the gradient norm: clipping surely binds, so grad/... read after it would differ
LR = 1e-3


def build_model() -> torch.nn.Module:
    """The same weights on every rank and every call (seeded), float32, training mode."""
    model = tiny_model("llama", attn_implementation="sdpa", seed=0)
    vsp.apply_vscale(model, mode="learned")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vscale" in name:
                p.copy_(torch.empty(p.shape).uniform_(-0.7, 0.7, generator=gen))
        # Plant a sink in layer 0: every token carries a little of feature 0, BOS is feature 1 alone; the queries read
        # feature 0 and the keys feature 1 into head dimension 3, whose RoPE frequency is lowest (almost no rotation
        # over 48 positions), so every query attends to a BOS at position 0.
        emb = model.model.embed_tokens.weight
        emb[:, 0] += 0.05
        emb[BOS].zero_()
        emb[BOS, 1] = 1.0
        attn = model.model.layers[0].self_attn
        d = attn.head_dim
        for h in range(attn.q_proj.out_features // d):
            attn.q_proj.weight[h * d + 3, 0] += 5.0
        for h in range(attn.k_proj.out_features // d):
            attn.k_proj.weight[h * d + 3, 1] += 1.0
    return model.train()


def full_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    ids[:3, 0] = BOS
    return ids


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def plain(ids: torch.Tensor, rank: int) -> dict:
    half = ids[2 * rank : 2 * rank + 2]
    model = build_model()
    collector = vsp.StatsCollector(model, every=1)
    out: dict = {"hooks_before": hook_count(model)}
    with collector.capture(0):
        loss = model(input_ids=half, labels=half).loss
        out["hooks_inside"] = hook_count(model)
        loss.backward()
    out["hooks_after"] = hook_count(model)
    out["metrics"] = collector.result()

    # Idle step of a plain module: no hooks, nothing returned.
    idle = vsp.StatsCollector(model, every=2)
    with idle.capture(1):
        out["idle_hooks_at_entry"] = hook_count(model)
        loss = model(input_ids=half, labels=half).loss
        out["idle_hooks_after_forward"] = hook_count(model)
        loss.backward()
    out["idle_result"] = idle.result()

    local = vsp.StatsCollector(build_model(), every=1, distributed=False)
    with local.capture(0):
        local.model(input_ids=half, labels=half).loss.backward()
    out["local_metrics"] = local.result()
    return out


# Real tokens per padded row: ranks hold rows (0, 1) and (2, 3), 40 + 48 = 44 + 44 tokens each.
PADDED_LENGTHS = (40, 48, 44, 44)


def padded_batch(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``ids`` cut to PADDED_LENGTHS, rows 0 and 2 left-padded, 1 and 3 right-padded (pad id 0)."""
    padded = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PADDED_LENGTHS):
        cols = slice(SEQ_LEN - n, SEQ_LEN) if row % 2 == 0 else slice(0, n)
        padded[row, cols], mask[row, cols] = ids[row, :n], 1
    return padded, mask


def padded(ids: torch.Tensor, rank: int) -> dict:
    x, mask = (t[2 * rank : 2 * rank + 2] for t in padded_batch(ids))
    collector = vsp.StatsCollector(build_model(), every=1)
    with collector.capture(0):
        collector.model(input_ids=x, attention_mask=mask, labels=causal_lm_labels(x, mask)).loss.backward()
    return collector.result()


def engine_step(engine, ids: torch.Tensor, rank: int, on_forward=None) -> list[float]:
    losses = []
    for mb in range(GAS):
        x = ids[2 * rank + mb : 2 * rank + mb + 1]
        loss = engine(input_ids=x, labels=x).loss
        if on_forward is not None:
            on_forward()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def stage(stage_: int, ids: torch.Tensor, rank: int, world: int) -> dict:
    model = build_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=engine_config(stage_, 1, world, accumulation=GAS, lr=LR, clip=CLIP),
    )
    module = engine.module
    out: dict = {"zero_stage": engine.zero_optimization_stage(), "hooks_before": hook_count(module)}
    inside: dict = {}

    def observe() -> None:
        inside["hooks"] = hook_count(module)
        inside["backward_wrapped"] = "backward" in engine.__dict__

    collector = vsp.StatsCollector(engine, every=1)
    with collector.capture(0):
        out["losses"] = engine_step(engine, ids, rank, observe)
    out["hooks_inside"] = inside["hooks"]
    out["backward_wrapped_inside"] = inside["backward_wrapped"]
    out["hooks_after"] = hook_count(module)
    out["backward_restored"] = "backward" not in engine.__dict__
    norm = engine.get_global_grad_norm()  # None under ZeRO stage 0
    out["global_grad_norm"] = None if norm is None else float(norm)
    out["metrics"] = collector.result()

    idle = vsp.StatsCollector(engine, every=2)
    out["idle_hooks_before"] = hook_count(module)
    with idle.capture(1):
        inside.clear()
        out["idle_hooks_at_entry"] = hook_count(module)
        engine_step(engine, ids, rank, observe)
    out["idle_hooks_inside"] = inside["hooks"]
    out["idle_backward_wrapped_inside"] = inside["backward_wrapped"]
    out["idle_result"] = idle.result()
    return out


def work(out: Path, rank: int, world: int) -> dict:
    ids = full_batch()
    res: dict = {"ids": ids.tolist()}
    if rank == 0:
        res["reference"] = vsp.measure(build_model(), ids)
        res["padded_reference"] = vsp.measure(build_model(), *padded_batch(ids))
        res["per_sequence"] = [vsp.measure(build_model(), ids[j : j + 1]) for j in range(BATCH)]
    res["plain"] = plain(ids, rank)
    res["padded"] = padded(ids, rank)
    res["stages"] = {str(s): stage(s, ids, rank, world) for s in STAGES}
    return res


if __name__ == "__main__":
    worker_main(work)
