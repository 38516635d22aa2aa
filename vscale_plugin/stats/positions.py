"""Where each sequence of a batch starts: SPEC section 2 counts positions from each sequence's first real token
(position 0 = the first position whose ``attention_mask`` is 1), and pad positions enter no sum, mean or norm.

So a left-padded row is read from its first real token, a right-padded one stops at its last, and a padded batch
reports what its sequences, unpadded, report together.

Under sequence parallelism (DeepSpeed Ulysses) a rank holds one contiguous shard of each (unpadded) sequence:
:meth:`Rows.shard` places its positions in the sequences' own, so that profiles added over the ranks of the group
count every position once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rows:
    """The real tokens of each row of a micro-batch: positions ``start .. start + length - 1``."""

    start: torch.Tensor  # (batch,) int64
    length: torch.Tensor  # (batch,) int64
    padded: bool  # False: every row is real from position 0 to the end (no gather needed)
    offset: int = 0  # the sequence position of this tensor's first one (a sequence-parallel shard); 0 otherwise
    stop: int | None = None  # one past the shard's last sequence position; None: the whole sequence

    @classmethod
    def unpadded(cls, batch: int, seq_len: int, device: torch.device) -> Rows:
        return cls(
            start=torch.zeros(batch, dtype=torch.long, device=device),
            length=torch.full((batch,), seq_len, dtype=torch.long, device=device),
            padded=False,
        )

    @classmethod
    def shard(cls, batch: int, seq_len: int, offset: int, local_len: int, device: torch.device) -> Rows:
        """Unpadded sequences of ``seq_len`` tokens of which this tensor holds positions ``offset .. offset +
        local_len - 1``."""
        whole = cls.unpadded(batch, seq_len, device)
        return cls(whole.start, whole.length, padded=False, offset=offset, stop=offset + local_len)

    def whole(self) -> Rows:
        """The same sequences, as a tensor holding all their positions has them."""
        return Rows(self.start, self.length, self.padded)

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> Rows:
        """The rows of a ``(batch, seq_len)`` 0/1 attention mask (None: no padding). Real tokens must be contiguous
        in each row (left or right padding); anything else is an error, since no unpadded sequence matches it."""
        if attention_mask is None:
            return cls.unpadded(batch, seq_len, device)
        mask = attention_mask.detach().to(device).bool()
        if mask.shape != (batch, seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids {(batch, seq_len)}; give one 0/1 entry "
                "per token"
            )
        if bool(mask.all()):
            return cls.unpadded(batch, seq_len, device)
        length = mask.sum(1)
        rows = cls(start=torch.where(length > 0, mask.long().argmax(1), torch.zeros_like(length)), length=length,
                   padded=True)  # fmt: skip
        contiguous = rows.mask(seq_len)
        if not torch.equal(contiguous, mask):
            row = int((contiguous != mask).any(1).nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} has padding between real tokens; the statistics count positions from each "
                "sequence's first real token and need left or right padding (all pads before or after the tokens)"
            )
        return rows

    def mask(self, seq_len: int) -> torch.Tensor:
        """(batch, seq_len) bool at the tensor's positions: the attention mask these rows came from."""
        positions = self.offset + torch.arange(seq_len, device=self.start.device)[None, :]
        return (positions >= self.start[:, None]) & (positions < (self.start + self.length)[:, None])

    def valid(self, n: int) -> torch.Tensor:
        """(batch, n) bool: whether each row has a real token at position p = 0 .. n-1 (counted from its start)."""
        return torch.arange(n, device=self.length.device)[None, :] < self.length[:, None]

    def align(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``x`` of shape (batch, T, ...) read at positions 0 .. n-1 of each row, zero where a row has no token there;
        n is capped at T."""
        if self.stop is not None:  # a shard: its positions in place, zero where other ranks hold the sequence
            n = min(n, int(self.length.max()))
            out = x.new_zeros(x.shape[0], n, *x.shape[2:])
            end = min(n, self.stop)
            if end > self.offset:
                out[:, self.offset : end] = x[:, : end - self.offset]
            return out
        n = min(n, x.shape[1])
        if not self.padded:
            return x[:, :n]
        index = (self.start[:, None] + torch.arange(n, device=x.device)[None, :]).clamp(max=x.shape[1] - 1)
        trailing = (1,) * (x.dim() - 2)
        picked = x.gather(1, index.view(*index.shape, *trailing).expand(-1, -1, *x.shape[2:]))
        return picked * self.valid(n).view(*index.shape, *trailing).to(picked.dtype)

    def counts(self, n: int) -> torch.Tensor:
        """(n,) float64: how many rows have a real token at each position 0 .. n-1 (in this shard, for a shard)."""
        valid = self.valid(n)
        if self.stop is not None:
            positions = torch.arange(n, device=valid.device)[None, :]
            valid = valid & (positions >= self.offset) & (positions < self.stop)
        return valid.double().sum(0)
