"""Perplexity and bits per byte of held-out text (SPEC section 7): token-level perplexity over non-overlapping windows
of the context, and the same negative log-likelihood per UTF-8 byte, so that models with different tokenizers
compare."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vscale_plugin.data import Tokenizer


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood of the predicted tokens, nats
    tokens: int  # predicted tokens: every token of a window but its first
    bytes: int | None  # UTF-8 bytes of the predicted tokens' text; None for a tokenizer without text

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)  # exp(mean token NLL)

    @property
    def bpb(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None  # bits per byte = NLL / ln 2 / bytes


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    tokenizer: Tokenizer | None = None,
    max_windows: int | None = None,
) -> Perplexity:
    """The model's perplexity on ``windows`` (``(batch, context)`` token tensors, non-overlapping windows of the
    held-out text): within each window every token but the first is predicted from those before it, as in training.

    ``tokenizer`` with text: bytes are those of each window's predicted tokens decoded. ``max_windows``: stop after
    that many windows (rows). Raises ValueError when there is no window.
    """
    device = next(model.parameters()).device
    nll, tokens, n_bytes, rows = 0.0, 0, 0, 0
    with_bytes = tokenizer is not None and tokenizer.has_text
    for batch in windows:
        if max_windows is not None:
            batch = batch[: max_windows - rows]
        if batch.numel() == 0:
            break
        ids = batch.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        tokens += ids[:, 1:].numel()
        if with_bytes:
            n_bytes += sum(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in batch)
        rows += batch.shape[0]
        if max_windows is not None and rows >= max_windows:
            break
    if tokens == 0:
        raise ValueError("no held-out window to measure perplexity on: the eval split is shorter than one context")
    return Perplexity(nll, tokens, n_bytes if with_bytes else None)
