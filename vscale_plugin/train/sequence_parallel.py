"""DeepSpeed Ulysses sequence parallelism in the launcher (``"sequence_parallel_size": N`` in ``--ds_config``).

Each sequence-parallel (SP) group is ``N`` consecutive ranks (DeepSpeed's ``parallel_state_sp``); each of its ranks
holds positions ``r * T / N .. (r + 1) * T / N - 1`` of every sequence of the group's micro-batches and Ulysses
exchanges them around the attention kernel (:mod:`vscale_plugin.hf.sequence_parallel`).

The data: the ranks of an SP group read the same batches (the data is split over the ``world / N`` data-parallel
ranks, ``rank // N``, as under AutoTP) and each takes its shard of every micro-batch. With ``D = world / N``
data-parallel ranks, ``m`` sequences per micro-batch and ``g`` accumulation steps, an optimiser step covers
``D`` groups x ``g`` micro-batches x ``m`` sequences = ``--global_batch``, each sequence once (over its group's ``N``
shards): the sequences a run without SP of ``D`` ranks trains on, in the same order.

The shards are DeepSpeed's ``UlyssesSPDataLoaderAdapter``'s (labels padded with -100 and shifted, ``shift_labels``,
then every tensor sliced to the rank's positions), cut here from the batch every rank of the group already holds.
The adapter is for loaders whose ranks read batches of their own: it gathers one from each rank of the group and
hands out the shards of each in turn, so it would give each batch of a group ``N`` times here; fed disjoint
batches instead, it keeps shards across optimiser steps whenever the accumulation steps are not a multiple of ``N``,
which a checkpoint's data position does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vscale_plugin.data import Tokenizer
from vscale_plugin.data.hub import offline_for
from vscale_plugin.hf.sequence_parallel import (
    check_sequence_parallel,
    check_sequence_parallel_batch,
    sequence_parallel_loss,
)
from vscale_plugin.launch.cli import ConfigError
from vscale_plugin.train.config import RunConfig
from vscale_plugin.train.recipe import llama_config


def check_model(config: RunConfig, tokenizer: Tokenizer) -> None:
    """A ConfigError (before anything is built) when the model of ``config`` cannot train under Ulysses with
    ``config.sequence_parallel`` ranks per sequence: eager attention, heads or KV heads that do not split, layers
    whose sliding window the dropped mask holds, a DeepSpeed too old (``check_sequence_parallel``'s checks, on the
    model built on the meta device: no weights)."""
    if config.sequence_parallel == 1:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.init_from is not None:
        model_config = AutoConfig.from_pretrained(
            config.init_from, local_files_only=offline_for(config.init_from) is not None
        )
    else:
        model_config = llama_config(config.recipe, config.recipe.vocab_size or tokenizer.vocab_size, tokenizer.eos_id)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, attn_implementation=config.attn_implementation)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"--attn_implementation {config.attn_implementation}: {err}") from err
    try:
        check_sequence_parallel(model, config.sequence_parallel, config.attn_implementation, config.world_size,
                                config.ds_config)  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"{err} (sequence_parallel_size in --ds_config, --attn_implementation)") from err


def register(model: nn.Module, config: RunConfig):
    """Put Ulysses in place of the model's attention function and make the SP groups; returns the ``mpu`` for
    ``deepspeed.initialize`` (None without sequence parallelism). A collective: every rank calls it."""
    if config.sequence_parallel == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    recipe = config.recipe
    return UlyssesSPAttentionHF.register_with_transformers(
        model,
        config.attn_implementation,
        config.sequence_parallel,
        micro_batch_size=recipe.micro_batch,
        seq_length=recipe.seq_len,
        seq_length_is_variable=False,
    )


@dataclass(frozen=True)
class SequenceShards:
    """This rank's place in its SP group, and how the shards' losses combine into the micro-batch's."""

    group: Any
    size: int
    rank: int
    zero_stage: int

    @classmethod
    def of(cls, engine, config: RunConfig, rank: int) -> SequenceShards | None:
        if config.sequence_parallel == 1:
            return None
        return cls(engine.seq_parallel_group, config.sequence_parallel, config.sequence_parallel_rank(rank),
                   engine.zero_optimization_stage())  # fmt: skip

    def loss(self, engine, batch: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of the whole ``batch`` (``(micro_batch, T)``, the same on every rank of the
        group) from this rank's shard; its gradient is this shard's share (see ``sequence_parallel_loss``)."""
        length = batch.shape[1]
        positions = torch.arange(length, device=batch.device).expand_as(batch)
        check_sequence_parallel_batch({"input_ids": batch, "position_ids": positions}, self.size)
        shift_labels = F.pad(batch, (0, 1), value=-100)[:, 1:]
        chunk = length // self.size
        mine = slice(chunk * self.rank, chunk * (self.rank + 1))
        ids, positions, labels = (t[:, mine].contiguous() for t in (batch, positions, shift_labels))
        local = engine(input_ids=ids, position_ids=positions, labels=labels, shift_labels=labels).loss
        return sequence_parallel_loss(local, labels, self.group, self.zero_stage)


def micro_batch_loss(engine, batch: torch.Tensor, shards: SequenceShards | None) -> torch.Tensor:
    """The loss of one micro-batch: the model's own, or under sequence parallelism combined over the SP group."""
    if shards is None:
        return engine(input_ids=batch, labels=batch).loss
    return shards.loss(engine, batch)
