"""V-scale and the gradient-sink statistics in a TRL SFTTrainer run that builds the model itself (model="name").

    pip install "vscale-plugin[trl]"
    deepspeed --num_gpus 2 examples/trl_sft.py --model <hf model dir or name> --data c4.jsonl \
        --ds_config ds_configs/zero2.json --output_dir out/trl_sft

SFTTrainer loads the model from its name, so V-scale goes in through the before-load door: after
``vsp.patch_model_classes()`` every causal LM transformers builds is V-scaled (under ZeRO-3 inside ``zero.Init``
too). TRL tokenises and packs the documents itself (``packing_strategy="wrapped"``: concatenated and cut into
``--seq_len`` blocks). MLflow: MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME as for any Trainer run. What this file
adds to an ordinary TRL script is marked "vscale-plugin".
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence

import torch
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

import vscale_plugin as vsp
from vscale_plugin.integrations.transformers import GradientSinkCallback, without_vscale_decay
from vscale_plugin.ops.vscale import MODES


class VScaleSFTTrainer(SFTTrainer):
    """vscale-plugin: an SFTTrainer that keeps theta out of weight decay (the Trainer decays every parameter that
    is not a bias or a norm)."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return without_vscale_decay(super().get_decay_parameter_names(model), model)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory or name; SFTTrainer loads it")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: --model)")
    p.add_argument("--data", required=True, help="JSON lines with a 'text' field (e.g. C4's files)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed config ('auto' values are filled by Trainer)")
    p.add_argument("--output_dir", default="out/trl_sft")
    p.add_argument("--vscale", default="learned", choices=("off", *MODES))
    p.add_argument("--every", type=int, default=100, help="optimiser steps between gradient-sink captures")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4, help="per device")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 autocast (TRL's default) or fp32"
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--report_to", default="mlflow", help="comma-separated Trainer integrations, or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def build_trainer(args: argparse.Namespace, callbacks: Sequence = ()) -> VScaleSFTTrainer:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    config = SFTConfig(
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
        bf16=args.precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        max_length=args.seq_len,
        packing=True,
        packing_strategy="wrapped",
        model_init_kwargs={"dtype": torch.float32},
    )
    # vscale-plugin: the model SFTTrainer builds from the name comes out V-scaled; the classes are restored after
    door = vsp.patch_model_classes(mode=args.vscale) if args.vscale != "off" else contextlib.nullcontext()
    with door:
        return VScaleSFTTrainer(
            model=args.model,
            args=config,
            train_dataset=load_dataset("json", data_files=args.data, split="train"),
            processing_class=tokenizer,
            # vscale-plugin: every SPEC section 4 key in the Trainer's logs every `every` steps
            callbacks=[GradientSinkCallback(every=args.every), *callbacks],
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    trainer = build_trainer(args)
    trainer.train()
    trainer.save_model()  # a V-scale checkpoint: vsp.from_pretrained(args.output_dir) restores theta


if __name__ == "__main__":
    main()
