"""The DeepSpeed engine of a run: parameter groups (weight decay), optimiser, schedule, ``deepspeed.initialize``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vscale_plugin.hf.decay import decay_parameter_groups
from vscale_plugin.launch.ops import load_op
from vscale_plugin.train.recipe import Preset
from vscale_plugin.train.schedule import lr_lambda


def build_engine(model: nn.Module, recipe: Preset, ds_config: dict[str, Any], mpu: Any = None):
    """``deepspeed.initialize`` of ``model`` with the recipe's AdamW and schedule; returns (engine, scheduler).
    ``mpu``: Ulysses' parallel state under sequence parallelism (``train.sequence_parallel.register``)."""
    import deepspeed

    groups = decay_parameter_groups(model, recipe.weight_decay)  # norms, biases and theta spared
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        load_op("CPUAdamBuilder")  # built here so that a stale build lock cannot hang it
        optimizer = DeepSpeedCPUAdam(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, adamw_mode=True)
    else:
        # fused: one in-place kernel over ZeRO's flat partitions; the default path allocates temporaries the size
        # of the model for each of its element-wise steps (on CPU this made the launcher 2x slower than a plain loop)
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    return engine, scheduler
