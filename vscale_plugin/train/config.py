"""The run configuration: everything one training run is, as data. ``cli.build_config`` makes it once from the
flags (validating them); every part of ``train/`` reads what it needs from it and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vscale_plugin.train.recipe import Preset


@dataclass(frozen=True)
class RunConfig:
    """One pretraining run, resolved: the recipe with its overrides, the filled DeepSpeed config, the save dir."""

    # what to train
    recipe: Preset  # the preset with --max_steps, --seq_len, ... applied and the batch sizes resolved for world_size
    init_from: str | None  # an HF model to continue instead of a new preset model
    vscale: str  # one of vscale_plugin.ops.MODES, or "off" (the baseline)
    vscale_kernel: str  # one of vscale_plugin.ops.KERNELS
    attn_implementation: str
    activation_checkpointing: bool
    seed: int
    # on what
    dataset: str
    tokenizer: str | None  # as given; None picks the default (see tokenizer_spec)
    # how
    ds_config: dict[str, Any]  # every "auto" filled
    world_size: int
    tensor_parallel: int  # DeepSpeed AutoTP's tensor_parallel.autotp_size (1: none); divides world_size
    sequence_parallel: int  # DeepSpeed Ulysses' sequence_parallel_size (1: none); divides world_size; not with TP
    eval_every: int
    eval_batches: int
    stats_every: int  # 0: no statistics
    log_every: int
    stop_after_steps: int | None
    # where
    save_dir: Path
    save_every: int  # 0: only at the end
    export_every: int  # steps between exports of save_dir/hf/ (0: only at the end)
    resume: bool
    resume_tensor_parallel: int | None  # on --resume with another TP size: the checkpoint's (from its universal form)
    checkpoint: bool  # False under --no_checkpoint: nothing is written (no checkpoint, no hf/), not even at the end
    experiment: str
    run_name: str

    @property
    def tokenizer_spec(self) -> str | None:
        """The tokenizer to build: --tokenizer, else the --init_from model's own (a model brings its tokenizer)."""
        return self.tokenizer or self.init_from

    @property
    def preset_tag(self) -> str:
        """The MLflow ``preset`` tag: the preset's name, or "init_from" for a continued model."""
        return self.recipe.name if self.init_from is None else "init_from"

    @property
    def zero_stage(self) -> int:
        return self.ds_config.get("zero_optimization", {}).get("stage", 0)

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks: the ranks of one tensor-parallel group train on the same batches, those of one
        sequence-parallel group on shards of the same batches."""
        return self.world_size // (self.tensor_parallel * self.sequence_parallel)

    def data_parallel_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank``: DeepSpeed's AutoTP groups are consecutive ranks (its mesh is
        (data_parallel, tensor_parallel), tensor-parallel innermost), so ``rank // tensor_parallel``; so are its
        Ulysses groups (``parallel_state_sp``: ranks ``i * sp .. (i + 1) * sp - 1``), so ``rank // sequence_parallel``.
        """
        return rank // (self.tensor_parallel * self.sequence_parallel)

    def sequence_parallel_rank(self, rank: int) -> int:
        """Which shard of each sequence global ``rank`` holds in its sequence-parallel group (0 without SP)."""
        return rank % self.sequence_parallel

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config["bf16"]["enabled"])

    def end_after(self, start_step: int) -> int:
        """The step this invocation stops at: --max_steps, or earlier under --stop_after_steps."""
        if self.stop_after_steps is None:
            return self.recipe.max_steps
        return min(self.recipe.max_steps, start_step + self.stop_after_steps)
