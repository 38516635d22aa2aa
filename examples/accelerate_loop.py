"""V-scale and the gradient-sink statistics in a hand-written Accelerate loop: collector.start(step) / stop().

    accelerate launch examples/accelerate_loop.py --model <hf model dir or name> --data c4.jsonl
    deepspeed --num_gpus 2 examples/accelerate_loop.py ... --ds_config ds_configs/zero2.json

Under DeepSpeed, ``accelerator.prepare`` returns the engine and ``accelerator.backward`` runs backward and the
optimiser step in one call; the collector reads the gradients inside it, before the step. Metrics are printed as JSON
lines by the main process (log them wherever your loop logs). What vscale-plugin adds is marked "vscale-plugin".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch
from accelerate import Accelerator, PartialState
from hf_trainer import packed_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

import vscale_plugin as vsp


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory or name")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: --model)")
    p.add_argument("--data", required=True, help="JSON lines with a 'text' field")
    p.add_argument("--ds_config", default=None, help="DeepSpeed config: run the loop under DeepSpeed")
    p.add_argument("--every", type=int, default=100, help="optimiser steps between gradient-sink captures")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    plugin = None
    if args.ds_config:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=args.ds_config, gradient_accumulation_steps=args.grad_accum)
    if not torch.cuda.is_available():
        # CPU ranks (the deepspeed launcher or `accelerate launch`): a gloo process group first, as Trainer's use_cpu
        # does; an Accelerator without a GPU would otherwise see one process and size DeepSpeed's batch for it.
        PartialState(cpu=True)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, deepspeed_plugin=plugin)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32))  # vscale-plugin
    # vscale-plugin: theta, biases and norms in a group without weight decay
    optimizer = torch.optim.AdamW(vsp.decay_parameter_groups(model, args.weight_decay), lr=args.lr)
    data = packed_dataset(args.data, tokenizer, args.seq_len).with_format("torch")
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=default_data_collator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    collector = vsp.StatsCollector(model, every=args.every)  # vscale-plugin: the engine, or the model without one

    logged, step, batches = [], 0, iter(loader)
    model.train()
    while step < args.max_steps:
        collector.start(step + 1)  # vscale-plugin: hooks only when step + 1 is due
        for _ in range(args.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    collector.read_parameter_gradients()  # vscale-plugin: before clipping (no-op under DeepSpeed)
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
        step += 1
        stats = collector.stop()  # vscale-plugin: {} unless step was due; a collective on due steps
        record = {"step": step, "loss": loss.item(), **stats}
        logged.append(record)
        if accelerator.is_main_process and stats:
            print(json.dumps(record), flush=True)
    return logged


if __name__ == "__main__":
    main()
