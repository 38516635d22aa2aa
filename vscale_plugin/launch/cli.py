"""One-line errors for every launcher: a bad input is ``error: <what was wrong and the fix>`` and exit code 2; and the
checks of a model to load that the launchers share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The weights file (or index of shards) save_pretrained writes, one of which a model directory holds.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ConfigError(ValueError):
    """A bad --ds_config or batch setting; the message names the fix. Launchers exit 2 on it."""


class UsageError(ConfigError):
    """A bad flag value; the message names the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (via UsageError and ``fail``), not a usage block.
    Every launcher uses it."""

    def error(self, message: str):
        raise UsageError(f"{message}; see --help")


def fail(message: str, rank: int = 0) -> int:
    """Print the ``error:`` line (on rank 0 only: the launchers raise their errors on every rank alike, so that all
    ranks stop, and the user reads it once) and return the exit code 2."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def check_model_config(
    name: str, flag: str, seq_len: int, needs_registry: bool, needs_statistics: bool, hint: str = ""
) -> PretrainedConfig:
    """The transformers config of the model that ``flag`` names (a directory or a hub name), checked before anything
    is loaded: it is a model (a config, and weights in a directory), of an architecture the registry supports where
    V-scale or the statistics are wanted, with positions for ``seq_len`` tokens. Raises UsageError naming the fix;
    ``hint`` is appended to the errors about the architecture (e.g. how to do without V-scale)."""
    from transformers import AutoConfig

    from vscale_plugin.data.hub import offline_for
    from vscale_plugin.hf.registry import architecture_of

    path = Path(name).expanduser()
    offline = offline_for(name)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name, local_files_only=offline is not None)
    except (OSError, ValueError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if offline is not None:
            cause = f"not in the local Hugging Face cache, and the hub cannot be reached: {offline}"
        raise UsageError(
            f"{flag} {name}: not a Hugging Face model ({cause}); give a directory written by save_pretrained "
            "(config.json and weights) or a hub name"
        ) from err
    training_checkpoint = (path / "latest").is_file()  # a launchers/pretrain.py --save_dir: DeepSpeed's weights
    if path.is_dir() and not training_checkpoint and not any((path / f).is_file() for f in _WEIGHTS):
        raise UsageError(
            f"{flag} {name}: has a config.json but no weights ({', '.join(_WEIGHTS)}); save the model with "
            "save_pretrained, or give another directory"
        )
    suffix = f"; {hint}" if hint else ""
    if needs_registry or needs_statistics:
        try:
            # The registry's own error (it lists the supported model types); it reads only model.config.model_type.
            arch = architecture_of(SimpleNamespace(config=config))
        except NotImplementedError as err:
            raise UsageError(f"{flag} {name}: {err}{suffix}") from err
        if needs_statistics and not arch.has_statistics:
            raise UsageError(
                f"{flag} {name}: model_type {arch.model_type!r} has no gradient-sink statistics: {arch.no_statistics}"
                f"{suffix}"
            )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise UsageError(
            f"--seq_len {seq_len} is more than the {positions} positions of {flag} {name} (max_position_embeddings), "
            f"which it was not trained for; pass --seq_len {positions} or less"
        )
    return config
