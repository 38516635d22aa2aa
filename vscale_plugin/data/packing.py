"""Documents to fixed windows: tokenise on the fly, append EOS (never BOS), cut the token stream into batches.

Training order, for one rank (all deterministic for ``seed``):

1. Each epoch visits the source's shards in an order drawn from ``(seed, epoch)``.
2. Ranks split the data as ``datasets.distributed.split_dataset_by_node`` does, by whole shards (each rank
   reads only its own files) when their number is a multiple of ``world_size``, else by taking every
   ``world_size``-th document, with one difference: with at least 8 shards per rank (C4's 1024 files on 24
   GPUs) ranks still take whole shards, some one more than others, rather than each reading all of C4.
   Either way the ranks' documents are disjoint and together cover the data, every epoch; which shards a
   rank gets changes with the epoch.
3. Consecutive blocks of a rank's documents are shuffled (the block's seed is ``(seed, epoch, block)``), so even a
   single file is read in a new order each epoch, and resuming only has to re-read one block.
4. Every document's tokens are followed by EOS; the stream is cut into ``micro_batch`` rows of ``seq_len``
   tokens. A document that does not fit continues in the next row or batch, across epochs too; nothing is
   dropped.

The position in this stream (epoch, block, where the block starts in the files, document, token) is the whole
state: :meth:`PackedBatches.state_dict` is a few integers, and resuming re-reads one block and continues with
exactly the batches an uninterrupted run would have produced. It is counted in tokens, not batches, so it does
not depend on ``seq_len`` or ``micro_batch``.

Eval reads once, in file order, without shuffling: C4's "validation" split, a saved dataset's own "validation"
split, or else a held-out slice of the local data (the first ``eval_docs`` documents, at most a tenth), which
training never sees. Every rank packs the same eval stream and keeps every ``world_size``-th batch, dropping an
incomplete last round, so all ranks run the same number of eval batches (ZeRO-3 needs every rank in each
forward) and every pass yields the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from typing import Any

import numpy as np
import torch

from vscale_plugin.data.errors import DataError, check_same_stream, check_stream, malformed_position
from vscale_plugin.data.sources import Source, Split, open_dataset
from vscale_plugin.data.tokenizer import Tokenizer

_STATE_VERSION = 1
# Documents shuffled together: enough to mix neighbouring documents of one file, few enough that resuming
# re-reads little (about 2 MB of C4 text) and the held texts stay small.
_SHUFFLE_BLOCK = 1024
# Documents tokenised per call: amortises the tokenizer's per-call cost without tokenising far ahead.
_ENCODE_CHUNK = 64
# From this many shards per rank on, ranks split by shard even when some get one more (see the module doc).
_SHARDS_PER_RANK = 8
# The held-out eval slice is at most this fraction of local data.
_EVAL_SHARE = 10


@dataclass(frozen=True)
class _Position:
    """Where a rank's training stream stands: the next token to pack."""

    epoch: int = 0
    block: int = 0
    shard_pos: int = 0  # where the block starts: index into this epoch's shard order ...
    index: int = 0  # ... entry within that shard ...
    counter: int = 0  # ... and documents of all ranks seen so far this epoch (for the per-document split)
    doc: int = 0  # document within the shuffled block
    token: int = 0  # token within that document, EOS included


class PackedBatches:
    """Batches of packed token windows from ``dataset`` for one data-parallel rank.

    Args:
        dataset: ``"smoke"``, ``"c4"`` or a path (see :mod:`vscale_plugin.data.sources`).
        tokenizer: from :func:`~vscale_plugin.data.build_tokenizer`.
        seq_len, micro_batch: each batch is a ``(micro_batch, seq_len)`` int64 tensor.
        rank, world_size: this rank's share of the data; ranks see disjoint documents.
        seed: document order; the same seed gives the same batches.
        split: ``"train"`` repeats the data forever, in a new order each epoch; ``"eval"`` is one pass,
            the same every time it is iterated.
        eval_docs: for local data without an eval split of its own, how many leading documents (in file order)
            are held out from training for eval; at most a tenth of the data.

    Iterating training batches continues from the current position, which :meth:`state_dict` saves and
    :meth:`load_state_dict` restores; iterate one iterator at a time.
    """

    def __init__(
        self,
        dataset: str,
        tokenizer: Tokenizer,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: Split = "train",
        eval_docs: int = 256,
    ) -> None:
        if seq_len < 1 or micro_batch < 1:
            raise DataError(f"seq_len {seq_len} and micro_batch {micro_batch} must both be at least 1")
        check_stream(rank, world_size, split)
        if eval_docs < 1:
            raise DataError(f"eval_docs {eval_docs} must be at least 1")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.split = split
        self.eval_docs = eval_docs
        self._source = open_dataset(dataset, split)
        self._held = _held_out(self._source, eval_docs) if self._source.holdout else {}
        if split == "eval" and self._source.holdout and not self._held:
            raise DataError(
                f"{self._source.label}: too few documents to hold out an eval slice (a tenth of the data, so at "
                f"least {_EVAL_SHARE} documents); add documents, or save the data as a DatasetDict with a "
                "'validation' split"
            )
        shards = self._source.num_shards
        self._by_shard = shards % world_size == 0 or shards >= _SHARDS_PER_RANK * world_size
        self._position = _Position()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.split == "eval":
            yield from self._eval_batches()
            return
        start = self._position
        for batch, position in self._pack(self._train_documents(start), start.token):
            self._position = position
            yield batch

    def check(self) -> None:
        """Raise now the DataError the first batch would raise later (at the first step, or at the first evaluation,
        a tenth of a run in): no documents for this rank, an eval split too small for one batch per rank, a file
        that cannot be read. Reads up to one batch (one per rank for eval); the position does not move."""
        if self.split == "train":
            next(self._pack(self._train_documents(self._position), self._position.token), None)
        elif next(self._eval_batches(), None) is None:
            raise DataError(
                f"{self._source.label}: its eval split holds fewer tokens than one batch per rank ({self.world_size} "
                f"x {self.micro_batch} x {self.seq_len}), so eval/loss would measure nothing; add documents, or lower "
                "--micro_batch or --seq_len"
            )

    def documents(self) -> Iterator[np.ndarray]:
        """This rank's tokenised documents, EOS appended, unpacked, in the order packing reads them: the training
        stream from the current position (forever), or one pass of the eval split (every ``world_size``-th document
        from the ``rank``-th, so ranks read disjoint documents)."""
        if self.split == "eval":
            documents = islice(self._eval_documents(), self.rank, None, self.world_size)
        else:
            documents = self._train_documents(self._position)
        return (tokens for tokens, _ in documents)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out, with what it is only valid for."""
        return {**self._identity(), "position": asdict(self._position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batches are those that followed it in the run that saved it."""
        check_same_stream(state, self._identity(), "the same dataset, tokenizer, seed and number of ranks")
        position = state.get("position")
        names = {f.name for f in fields(_Position)}
        if (
            not isinstance(position, dict)
            or set(position) != names
            or not all(isinstance(v, int) and v >= 0 for v in position.values())
        ):
            raise malformed_position(position)
        self._position = _Position(**position)

    def _identity(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "tokenizer": self.tokenizer.name,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "eval_docs": self.eval_docs,
        }

    def _pack(
        self, documents: Iterator[tuple[np.ndarray, _Position]], token: int
    ) -> Iterator[tuple[torch.Tensor, _Position]]:
        """Fill batches from consecutive documents, starting at ``token`` of the first; the position after each."""
        size = self.micro_batch * self.seq_len
        tokens, position = next(documents, (None, None))
        if tokens is None:
            return
        while True:
            batch = np.empty(size, dtype=np.int64)
            filled = 0
            while True:
                take = min(size - filled, len(tokens) - token)
                batch[filled : filled + take] = tokens[token : token + take]
                filled += take
                token += take
                if filled == size:
                    break
                tokens, position = next(documents, (None, None))
                if tokens is None:
                    return  # only a finite (eval) stream ends; its incomplete last batch is dropped
                token = 0
            yield torch.from_numpy(batch).view(self.micro_batch, self.seq_len), replace(position, token=token)

    def _train_documents(self, start: _Position) -> Iterator[tuple[np.ndarray, _Position]]:
        """This rank's documents, tokenised with EOS, from ``start`` on, forever."""
        epoch, block, doc = start.epoch, start.block, start.doc
        cursor = (start.shard_pos, start.index, start.counter)
        while True:
            reader = self._read_train(epoch, *cursor)
            while items := list(islice(reader, _SHUFFLE_BLOCK)):
                texts = [text for text, _ in items]
                order = list(range(len(texts)))
                random.Random(f"{self.seed}:{epoch}:{block}").shuffle(order)
                for first in range(doc, len(order), _ENCODE_CHUNK):
                    chunk = order[first : first + _ENCODE_CHUNK]
                    encoded = self.tokenizer.encode_batch([texts[i] for i in chunk])
                    for offset, ids in enumerate(encoded):
                        position = _Position(epoch, block, *cursor, doc=first + offset)
                        yield self._with_eos(ids), position
                cursor = items[-1][1]
                block += 1
                doc = 0
            if block == 0:
                if self.world_size == 1:
                    raise DataError(f"{self._source.label}: holds no documents to train on; add documents")
                raise DataError(
                    f"{self._source.label}: rank {self.rank} of {self.world_size} gets no documents to train on; "
                    "use fewer ranks or more data"
                )
            epoch, block, cursor = epoch + 1, 0, (0, 0, 0)

    def _read_train(
        self, epoch: int, shard_pos: int, index: int, counter: int
    ) -> Iterator[tuple[str, tuple[int, int, int]]]:
        """This rank's texts of one epoch from a cursor on, each with the cursor just after it."""
        order = list(range(self._source.num_shards))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self._by_shard:
            order = order[self.rank :: self.world_size]
        for pos in range(shard_pos, len(order)):
            shard = order[pos]
            first = max(index if pos == shard_pos else 0, self._held.get(shard, 0))
            for entry, text in enumerate(self._source.documents(shard, start=first), start=first):
                if text is None:
                    continue
                mine = self._by_shard or counter % self.world_size == self.rank
                counter += 1
                if mine:
                    yield text, (pos, entry + 1, counter)

    def _eval_batches(self) -> Iterator[torch.Tensor]:
        batches = (batch for batch, _ in self._pack(self._eval_documents(), 0))
        while len(round_ := list(islice(batches, self.world_size))) == self.world_size:
            yield round_[self.rank]

    def _eval_documents(self) -> Iterator[tuple[np.ndarray, _Position]]:
        """All eval documents in file order; positions are meaningless here (eval restarts on every pass)."""
        texts = (
            text
            for shard in range(self._source.num_shards)
            if not self._source.holdout or shard in self._held
            for text in self._source.documents(shard, stop=self._held[shard] if self._source.holdout else None)
            if text is not None
        )
        while chunk := list(islice(texts, _ENCODE_CHUNK)):
            for ids in self.tokenizer.encode_batch(chunk):
                yield self._with_eos(ids), _Position()

    def _with_eos(self, ids: list[int]) -> np.ndarray:
        tokens = np.empty(len(ids) + 1, dtype=np.int64)
        tokens[:-1] = ids
        tokens[-1] = self.tokenizer.eos_id
        return tokens


def _held_out(source: Source, eval_docs: int) -> dict[int, int]:
    """Leading entries per shard (in file order) that form the eval slice: ``eval_docs``, at most a tenth."""
    enough = _EVAL_SHARE * eval_docs
    counts: list[int] = []
    for shard in range(source.num_shards):
        counts.append(sum(1 for _ in source.documents(shard, stop=enough - sum(counts))))
        if sum(counts) >= enough:
            break
    remaining = eval_docs if sum(counts) >= enough else sum(counts) // _EVAL_SHARE
    held: dict[int, int] = {}
    for shard, count in enumerate(counts):
        if remaining == 0:
            break
        held[shard] = min(count, remaining)
        remaining -= held[shard]
    return held
