"""The models an evaluation reads: a directory written by ``save_pretrained`` (V-scale restored by
``vsp.from_pretrained``), or a ``launchers/pretrain.py --save_dir`` of any ZeRO stage, consolidated by DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint``. A training checkpoint also says what the model was trained on (its
record, ``vscale_run.json``): its tokenizer, dataset and context are the evaluation's defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vscale_plugin
from vscale_plugin.launch.cli import UsageError, check_model_config

RUN_RECORD = "vscale_run.json"  # written beside the checkpoints by vscale_plugin.train.checkpoint


@dataclass
class ModelSource:
    """Where a model comes from and what it was trained on; ``load`` builds it."""

    path: str  # an HF directory or hub name, or a training --save_dir
    label: str  # the name reports use
    tokenizer: str | None  # a build_tokenizer spec; None: the dataset's default
    dataset: str | None  # the training dataset, where known
    training_run_id: str | None = None  # the MLflow run that trained it, where known

    @property
    def is_training_checkpoint(self) -> bool:
        return is_training_checkpoint(self.path)

    def record(self) -> dict[str, Any]:
        """The training checkpoint's record ({} for an HF directory)."""
        return read_record(self.path) if self.is_training_checkpoint else {}


def is_training_checkpoint(path: str | Path) -> bool:
    """A ``launchers/pretrain.py --save_dir``: DeepSpeed's ``latest`` beside the model's config.json."""
    return (Path(path) / "latest").is_file() and (Path(path) / "config.json").is_file()


def read_record(save_dir: str | Path) -> dict[str, Any]:
    """What a launcher checkpoint recorded of its run: tokenizer, dataset, settings, MLflow run id."""
    path = Path(save_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UsageError(
            f"--model {save_dir}: {path} cannot be read ({err}); give an intact checkpoint directory"
        ) from err


def model_source(path: str, tokenizer: str | None = None, label: str | None = None) -> ModelSource:
    """The source ``--model path`` names, checked to be a model before anything is loaded (UsageError otherwise).
    ``tokenizer`` overrides the one a training checkpoint recorded; an HF directory's default is its own."""
    check_model_config(path, "--model", seq_len=1, needs_registry=False, needs_statistics=False)
    name = label or Path(path).name or path
    if is_training_checkpoint(path):
        record = read_record(path)
        return ModelSource(path, name, tokenizer if tokenizer is not None else record.get("tokenizer"),
                           record.get("dataset"), record.get("mlflow_run_id"))  # fmt: skip
    return ModelSource(path, name, tokenizer if tokenizer is not None else path, None)


def load_training_checkpoint(save_dir: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """The model of a ``launchers/pretrain.py --save_dir`` (any ZeRO stage), V-scale restored, its weights
    consolidated on the host by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    tp = (read_record(save_dir).get("settings") or {}).get("tensor_parallel", 1)
    if tp > 1:  # zero_to_fp32 expects one model-parallel rank ("Expected 1 of '*_optim_states.pt' ... found 2")
        raise UsageError(
            f"--model {save_dir}: its checkpoints hold the shards of tensor_parallel.autotp_size {tp}, which "
            f"DeepSpeed's consolidation does not join; give {Path(save_dir) / 'hf'} (the run's export, the whole "
            "model) instead"
        )
    config = AutoConfig.from_pretrained(str(save_dir))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    settings = getattr(config, "vscale", None)
    if settings:
        vscale_plugin.apply_vscale(model, **settings)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(save_dir)), strict=True)
    return model.to(dtype)


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> nn.Module:
    """The model of ``source`` in eval mode, V-scale restored where its config has it."""
    if source.is_training_checkpoint:
        return load_training_checkpoint(source.path, dtype, attn_implementation).eval()
    return load_pretrained(source.path, dtype, attn_implementation).eval()


def load_pretrained(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa") -> nn.Module:
    """``vsp.from_pretrained`` of an HF directory or hub name; what it cannot load is a UsageError naming the fix."""
    try:
        return vscale_plugin.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        raise UsageError(f"--model {path}: cannot be loaded ({str(err).splitlines()[0]}); give a local "
                         "directory, or a hub name on a machine with network access") from err  # fmt: skip


def vscale_mode(model: nn.Module) -> str:
    """The model's V-scale mode, "off" for a baseline."""
    return (getattr(model.config, "vscale", None) or {}).get("mode", "off")


def native_context(model: nn.Module) -> int:
    """The positions the model was trained for (max_position_embeddings; the presets set it to their context)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not positions:
        raise UsageError(f"{type(model).__name__} has no max_position_embeddings in its config; pass --context")
    return int(positions)
