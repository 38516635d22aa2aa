"""Pretraining data: tokenizers and documents packed into fixed windows with EOS and no BOS (SPEC sections 5, 6).

    tokenizer = build_tokenizer(None, "smoke", cache_dir)        # or "gpt2", a local HF directory, a .model file
    for batch in PackedBatches("c4", tokenizer, seq_len=1024, micro_batch=8, rank=rank, world_size=world_size):
        ...                                                      # (micro_batch, seq_len) int64
    for ids, mask in padded_batches(data.documents(), batch_size, seq_len, "left", pad_id=tokenizer.eos_id):
        ...                                                      # one document per row, padded, with its mask

``dataset`` is ``"smoke"`` (text that ships with Python), ``"c4"`` (``allenai/c4`` "en", streamed), a path
(jsonl/json/parquet/txt files or a ``Dataset.save_to_disk`` directory), or the synthetic ``"bigram_backcopy"``
task (:mod:`vscale_plugin.data.bigram_backcopy`: its own vocabulary, BOS first in every row, no packing).
"""

from __future__ import annotations

from pathlib import Path

from vscale_plugin.data.bigram_backcopy import BigramBackcopy, BigramBackcopyBatches, is_bigram_backcopy
from vscale_plugin.data.errors import DataError
from vscale_plugin.data.packing import PackedBatches
from vscale_plugin.data.padding import PaddingSide, padded_batches
from vscale_plugin.data.sources import smoke_documents
from vscale_plugin.data.tokenizer import TOKENIZER_CACHE, Tokenizer, build_tokenizer

# What the launcher iterates: either kind of batches (same interface: iterate, check, state_dict/load_state_dict).
Batches = PackedBatches | BigramBackcopyBatches

__all__ = [
    "TOKENIZER_CACHE",
    "Batches",
    "BigramBackcopy",
    "BigramBackcopyBatches",
    "DataError",
    "PackedBatches",
    "PaddingSide",
    "Tokenizer",
    "build_tokenizer",
    "check_dataset",
    "open_batches",
    "padded_batches",
    "smoke_documents",
]


def check_dataset(dataset: str) -> None:
    """A DataError naming the fix for a ``--dataset`` that names nothing: not smoke, c4, an existing path, or a
    well-formed bigram_backcopy task."""
    if is_bigram_backcopy(dataset):
        BigramBackcopy.parse(dataset)
    elif dataset not in ("smoke", "c4") and not Path(dataset).exists():
        raise DataError(
            f"--dataset {dataset}: no such file or directory; give a jsonl/json/parquet/txt file, a directory of them "
            "or a saved HF dataset, or use --dataset smoke / c4 / bigram_backcopy"
        )


def open_batches(
    dataset: str,
    tokenizer: Tokenizer,
    seq_len: int,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    split: str = "train",
) -> Batches:
    """This rank's batches of ``dataset``: packed documents, or rows of the synthetic task (which needs no
    tokenizer). Both iterate ``(micro_batch, seq_len)`` int64 tensors and save their position the same way."""
    if is_bigram_backcopy(dataset):
        return BigramBackcopyBatches(dataset, seq_len, micro_batch, rank=rank, world_size=world_size, seed=seed,
                                     split=split)  # fmt: skip
    return PackedBatches(dataset, tokenizer, seq_len, micro_batch, rank=rank, world_size=world_size, seed=seed,
                         split=split)  # fmt: skip
