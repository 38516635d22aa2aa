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
from hf_trainer import arguments, join_process_group, train_and_save, training_arguments
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

import vscale_plugin as vsp
from vscale_plugin.integrations.transformers import GradientSinkCallback, without_vscale_decay


class VScaleSFTTrainer(SFTTrainer):
    """vscale-plugin: an SFTTrainer that keeps theta out of weight decay (the Trainer decays every parameter that
    is not a bias or a norm)."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return without_vscale_decay(super().get_decay_parameter_names(model), model)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = arguments(__doc__.splitlines()[0], "out/trl_sft")  # examples/hf_trainer.py's flags, and:
    p.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp32"), help="bf16 autocast (TRL's default) or fp32"
    )
    return p.parse_args(argv)


def build_trainer(args: argparse.Namespace, callbacks: Sequence = ()) -> VScaleSFTTrainer:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    config = SFTConfig(
        **training_arguments(args),
        bf16=args.precision == "bf16",
        max_length=args.seq_len,
        packing=True,
        packing_strategy="wrapped",
        model_init_kwargs={"dtype": torch.float32},
    )
    join_process_group(config)  # under ZeRO-3 SFTTrainer builds the model partitioned, over every rank
    # vscale-plugin: the model SFTTrainer builds from the name comes out V-scaled; the classes are restored after
    door = vsp.patch_model_classes(mode=args.vscale) if args.vscale != "off" else contextlib.nullcontext()
    with door:
        return VScaleSFTTrainer(
            model=args.model,
            args=config,
            train_dataset=load_dataset("json", data_files=args.data, split="train"),
            processing_class=tokenizer,
            # vscale-plugin: every SPEC section 4 key in the Trainer's logs every `every` steps
            callbacks=[GradientSinkCallback(every=args.every, profiles=args.profiles), *callbacks],
        )


def main(argv: Sequence[str] | None = None) -> None:
    train_and_save(build_trainer(parse_args(argv)))


if __name__ == "__main__":
    main()
