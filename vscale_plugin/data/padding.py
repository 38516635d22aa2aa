"""One document per sequence, padded: the batches of supervised fine-tuning data, or of an analysis that wants each
document to start at position 0, with the ``attention_mask`` that tells real tokens from pads."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Literal

import numpy as np
import torch

from vscale_plugin.data.errors import DataError

PaddingSide = Literal["left", "right"]


def padded_batches(
    documents: Iterable[np.ndarray], batch_size: int, seq_len: int, side: PaddingSide, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` of ``batch_size`` documents each, every document cut to its first ``seq_len``
    tokens and padded with ``pad_id`` on ``side`` to the longest of its batch; an incomplete last batch is dropped."""
    if side not in ("left", "right"):
        raise DataError(f"padding side {side!r} is unknown; use 'left' or 'right'")
    documents = iter(documents)
    while len(batch := [doc[:seq_len] for doc in islice(documents, batch_size)]) == batch_size:
        width = max(len(doc) for doc in batch)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for row, doc in enumerate(batch):
            cols = slice(width - len(doc), width) if side == "left" else slice(0, len(doc))
            ids[row, cols] = torch.from_numpy(np.asarray(doc, dtype=np.int64))
            mask[row, cols] = 1
        yield ids, mask
