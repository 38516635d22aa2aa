"""The search behind the ``sinklab`` preset: train small Llamas on Bigram-Backcopy with a plain PyTorch loop (the
model, init, optimiser and schedule of the launcher, without DeepSpeed) and print, at each measurement, the sink
statistics the preset has to reach: per layer the sink rate (eps 0.3), column mass M_0, token-0 / rest |h_out|
and token-0 / rest value norm, measured by ``vsp.measure`` on a fixed batch of held-out sequences.

    python benchmarks/sinklab_search.py --layers 2 --hidden 64 --heads 4 --lr 1e-2 --weight_decay 0.01 --steps 3000

One line per measurement; ``--json`` appends them to a file. What was tried and what it gave is in
benchmarks/RESULTS.md ("sinklab").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vscale_plugin as vsp
from vscale_plugin.data.bigram_backcopy import BigramBackcopy, BigramBackcopyBatches
from vscale_plugin.train.model import new_model
from vscale_plugin.train.recipe import Preset, llama_config
from vscale_plugin.train.schedule import lr_lambda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--layers", type=int, default=2)
    add("--hidden", type=int, default=64)
    add("--heads", type=int, default=4)
    add("--head_dim", type=int, default=0, help="0: hidden / heads")
    add("--mlp", type=int, default=0, help="0: 4 x hidden")
    add("--seq_len", type=int, default=64)
    add("--batch", type=int, default=32)
    add("--lr", type=float, default=1e-2)
    add("--warmup", type=int, default=50)
    add("--weight_decay", type=float, default=0.01)
    add("--steps", type=int, default=3000)
    add("--measure_every", type=int, default=500)
    add("--dataset", default="bigram_backcopy")
    add("--vscale", default="off")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=0)
    add("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = BigramBackcopy.parse(args.dataset)
    head_dim = args.head_dim or args.hidden // args.heads
    preset = Preset("search", layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.heads,
                    head_dim=head_dim, mlp=args.mlp or 4 * args.hidden, seq_len=args.seq_len, lr=args.lr,
                    min_lr=args.lr / 10, warmup=args.warmup, max_steps=args.steps, global_batch=args.batch,
                    micro_batch=args.batch, vocab_size=task.vocab_size)  # fmt: skip
    model = new_model(llama_config(preset, task.vocab_size, 0), args.seed, "eager")
    if args.vscale != "off":
        vsp.apply_vscale(model, mode=args.vscale)
    groups = vsp.decay_parameter_groups(model, args.weight_decay)
    optimiser = torch.optim.AdamW(groups, lr=args.lr, betas=preset.betas, eps=preset.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda(preset))
    data = BigramBackcopyBatches(args.dataset, args.seq_len, args.batch, seed=args.seed)
    probe = BigramBackcopyBatches(args.dataset, args.seq_len, 32, seed=args.seed, split="eval").batch(0, 1)
    start = time.perf_counter()
    for step, batch in enumerate(data, start=1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        if step % args.measure_every == 0 or step == args.steps:
            _report(model, probe, task, step, loss.item(), time.perf_counter() - start, vars(args))
        if step == args.steps:
            break


@torch.no_grad()
def _report(model, probe, task, step, loss, seconds, settings) -> None:
    model.eval()
    logits = model(input_ids=probe).logits[:, :-1]
    targets = probe[:, 1:]
    copy = torch.from_numpy(task.copy_positions(probe.numpy()))[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    model.train()
    m = vsp.measure(model, probe)
    layers = sorted({k.rsplit("/", 1)[1] for k in m if k.startswith("as/sink_rate/L")})
    row = {
        "step": step, "seconds": round(seconds, 1), "loss": round(loss, 4),
        "copy_loss": round(losses[copy].mean().item(), 4), "bigram_loss": round(losses[~copy].mean().item(), 4),
    }  # fmt: skip
    for layer in layers:
        row[layer] = {
            "sink": round(m[f"as/sink_rate/{layer}"], 3),
            "mass": round(m[f"as/mass/{layer}"], 2),
            "h_out": round(m[f"ma/h_out/tok0/{layer}"] / m[f"ma/h_out/rest/{layer}"], 2),
            "v": round(m[f"ma/v/tok0/{layer}"] / m[f"ma/v/rest/{layer}"], 3),
            "mlp0": round(m[f"ma/mlp_out/tok0/{layer}"], 1),
            **{
                f"{f}": round(m[f"ma/{f}/tok0/{layer}"] / m[f"ma/{f}/rest/{layer}"], 2)
                for f in ("h_in", "h_half", "attn_out", "mlp_out")
            },
            "rgs": round(m[f"gs/ratio/{layer}"], 1),
        }
    print(json.dumps(row), flush=True)
    if settings["json"]:
        with open(settings["json"], "a") as f:
            f.write(json.dumps({"settings": settings, **row}) + "\n")


if __name__ == "__main__":
    main()
