"""Pretraining data: tokenizers and documents packed into fixed windows with EOS and no BOS (SPEC sections 5, 6).

    tokenizer = build_tokenizer(None, "smoke", cache_dir)        # or "gpt2", a local HF directory, a .model file
    for batch in PackedBatches("c4", tokenizer, seq_len=1024, micro_batch=8, rank=rank, world_size=world_size):
        ...                                                      # (micro_batch, seq_len) int64
    for ids, mask in padded_batches(data.documents(), batch_size, seq_len, "left", pad_id=tokenizer.eos_id):
        ...                                                      # one document per row, padded, with its mask

``dataset`` is ``"smoke"`` (text that ships with Python), ``"c4"`` (``allenai/c4`` "en", streamed) or a path
(jsonl/json/parquet/txt files or a ``Dataset.save_to_disk`` directory).
"""

from vscale_plugin.data.errors import DataError
from vscale_plugin.data.packing import PackedBatches
from vscale_plugin.data.padding import PaddingSide, padded_batches
from vscale_plugin.data.sources import smoke_documents
from vscale_plugin.data.tokenizer import TOKENIZER_CACHE, Tokenizer, build_tokenizer

__all__ = [
    "TOKENIZER_CACHE",
    "DataError",
    "PackedBatches",
    "PaddingSide",
    "Tokenizer",
    "build_tokenizer",
    "padded_batches",
    "smoke_documents",
]
