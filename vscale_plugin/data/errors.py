"""The one error type of the data pipeline, and the checks every kind of batches makes with it."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """A dataset or tokenizer the pipeline cannot use; the message names the problem and the fix.

    Launchers turn it into a one-line message and exit code 2, before any training starts.
    """


def check_stream(rank: int, world_size: int, split: str) -> None:
    """This rank's share and the split of a batch stream, as every kind of batches takes them."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}; launch through deepspeed or torchrun")
    if split not in ("train", "eval"):
        raise DataError(f"split {split!r} is unknown; use 'train' or 'eval'")


def check_same_stream(state: dict[str, Any], expected: dict[str, Any], resume_with: str) -> None:
    """A saved data position belongs to the stream described by ``expected`` (its identity), else a DataError naming
    each difference and what to ``resume_with``."""
    saved = {key: state.get(key) for key in expected}
    if saved != expected:
        differences = ", ".join(f"{k}={saved[k]!r} (now {expected[k]!r})" for k in expected if saved[k] != expected[k])
        raise DataError(
            f"the data position in the checkpoint belongs to another stream: {differences}; resume with {resume_with}"
        )


def malformed_position(position: Any) -> DataError:
    return DataError(f"the data position in the checkpoint is malformed ({position!r}); resume from another checkpoint")
