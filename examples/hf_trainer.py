"""V-scale and the gradient-sink statistics in a plain Hugging Face Trainer run with DeepSpeed, logged to MLflow by
transformers' own MLflowCallback.

    deepspeed --num_gpus 2 examples/hf_trainer.py --model <hf model dir or name> --data c4.jsonl \
        --ds_config ds_configs/zero2.json --output_dir out/hf_trainer

MLflow: set MLFLOW_TRACKING_URI (default ./mlruns) and MLFLOW_EXPERIMENT_NAME as for any Trainer run. What this file
adds to an ordinary Trainer script is marked "vscale-plugin"; the rest is the usual causal-LM recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from itertools import chain

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

import vscale_plugin as vsp
from vscale_plugin.integrations.transformers import GradientSinkCallback, VScaleTrainer
from vscale_plugin.ops.vscale import MODES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return arguments(__doc__.splitlines()[0], "out/hf_trainer").parse_args(argv)


def arguments(description: str, output_dir: str) -> argparse.ArgumentParser:
    """The flags of a Trainer run on C4-style JSON lines (examples/trl_sft.py adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or name to continue training")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: --model)")
    p.add_argument("--data", required=True, help="JSON lines with a 'text' field (e.g. C4's files)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed config ('auto' values are filled by Trainer)")
    p.add_argument("--output_dir", default=output_dir)
    p.add_argument("--vscale", default="learned", choices=("off", *MODES))
    p.add_argument("--every", type=int, default=100, help="optimiser steps between gradient-sink captures")
    p.add_argument("--profiles", action="store_true", help="also write per-position gradient profiles")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4, help="per device")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--report_to", default="mlflow", help="comma-separated Trainer integrations, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def training_arguments(args: argparse.Namespace) -> dict:
    """The TrainingArguments (or TRL SFTConfig) fields the flags set."""
    return dict(
        output_dir=args.output_dir,
        deepspeed=args.ds_config,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        save_strategy="no",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def packed_dataset(path: str, tokenizer, seq_len: int):
    """C4-style documents tokenised, joined with EOS and cut into seq_len blocks (the run_clm recipe)."""
    raw = load_dataset("json", data_files=path, split="train")
    eos = [tokenizer.eos_token_id]
    tokens = raw.map(
        lambda batch: {"input_ids": [tokenizer(t)["input_ids"] + eos for t in batch["text"]]},
        batched=True,
        remove_columns=raw.column_names,
    )

    def blocks(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = len(ids) // seq_len * seq_len
        return {"input_ids": [ids[i : i + seq_len] for i in range(0, n, seq_len)]}

    return tokens.map(blocks, batched=True, batch_size=1000)


def join_process_group(training: TrainingArguments) -> None:
    """Under DeepSpeed, the process group (Accelerate makes it) known to DeepSpeed too, before the model is built:
    ZeRO-3's zero.Init, which from_pretrained enters after TrainingArguments, would otherwise see one rank."""
    if training.deepspeed:
        import deepspeed

        _ = training.device  # the process group, made by Accelerate
        deepspeed.init_distributed()


def build_trainer(args: argparse.Namespace, callbacks: Sequence = ()) -> VScaleTrainer:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    training = TrainingArguments(**training_arguments(args))
    # After TrainingArguments, so that under ZeRO-3 the model is built partitioned (transformers' HfDeepSpeedConfig),
    # and after DeepSpeed knows the process group, so that zero.Init partitions over every rank.
    join_process_group(training)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.vscale != "off":
        vsp.apply_vscale(model, mode=args.vscale)  # vscale-plugin: before the Trainer builds its optimizer
    return VScaleTrainer(  # vscale-plugin: Trainer that keeps theta out of weight decay
        model=model,
        args=training,
        train_dataset=packed_dataset(args.data, tokenizer, args.seq_len),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        # vscale-plugin: every SPEC section 4 key in the Trainer's logs every `every` steps
        callbacks=[GradientSinkCallback(every=args.every, profiles=args.profiles), *callbacks],
    )


def train_and_save(trainer) -> None:
    trainer.train()
    trainer.save_model()  # a V-scale checkpoint: vsp.from_pretrained(args.output_dir) restores theta


def main(argv: Sequence[str] | None = None) -> None:
    train_and_save(build_trainer(parse_args(argv)))


if __name__ == "__main__":
    main()
