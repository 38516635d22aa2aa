"""The Bigram-Backcopy task of Guo et al. 2024 ("Active-dormant attention heads"), a synthetic stream on which a
small transformer forms attention sinks on the first token, small value states there and residual-norm peaks.

    --dataset bigram_backcopy                                   # the defaults below
    --dataset bigram_backcopy:vocab=64,triggers=3,sparsity=0.1,task_seed=0

Every sequence starts with BOS (id 0); the ordinary tokens are ids 1..vocab. After BOS, tokens follow a bigram
Markov chain whose rows are drawn from Dirichlet(sparsity) (small: sparse, nearly deterministic rows), except
after one of the ``triggers`` trigger tokens: there the next token copies the token before the trigger (the
"backcopy"). A copy head has to look back only after a trigger and should do nothing elsewhere; doing nothing by
attending to BOS is what makes it a sink. The triggers are the most frequent tokens of the chain (its stationary
distribution), as Guo et al. fix theirs, so that copying is frequent enough to learn.

Unlike the pretraining recipe's packing (EOS-separated documents, no BOS, SPEC section 5), each row here is one
sequence with BOS at position 0: token 0 is the BOS of every row. The task (chain and triggers) depends on
``task_seed`` only, so runs of different ``--seed`` learn the same task; the sequences depend on ``--seed``.

Sequence ``i`` of the training stream is drawn from its own generator ``(seed, 0, i)`` and rank ``r`` of ``W``
takes, as its ``n``-th micro-batch, sequences ``(n*W + r)*micro_batch ...`` on: the sequences of an optimiser step
are the same whatever the number of ranks and the accumulation split that make up one global batch. The position
(the next micro-batch) is the whole state. Eval draws from ``(seed, 1, i)``, sequences training never sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np
import torch

from vscale_plugin.data.errors import DataError, check_same_stream, check_stream, malformed_position
from vscale_plugin.data.tokenizer import Tokenizer

NAME = "bigram_backcopy"
BOS_ID = 0
_STATE_VERSION = 1
_TRAIN, _EVAL = 0, 1


@dataclass(frozen=True)
class BigramBackcopy:
    """The task: ``vocab`` ordinary tokens, the ``triggers`` most frequent of them triggers, bigram rows from
    Dirichlet(``sparsity``), all drawn from ``task_seed``."""

    vocab: int = 64
    triggers: int = 3
    sparsity: float = 0.1
    task_seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab < 2:
            raise DataError(f"{NAME}: vocab={self.vocab} needs at least 2 tokens")
        if not 1 <= self.triggers < self.vocab:
            raise DataError(f"{NAME}: triggers={self.triggers} must be between 1 and vocab-1 ({self.vocab - 1})")
        if not self.sparsity > 0:
            raise DataError(f"{NAME}: sparsity={self.sparsity} must be positive (the Dirichlet concentration)")

    @classmethod
    def parse(cls, spec: str) -> BigramBackcopy:
        """``bigram_backcopy`` or ``bigram_backcopy:key=value,...`` with keys vocab, triggers, sparsity, task_seed."""
        name, _, options = spec.partition(":")
        if name != NAME:
            raise DataError(f"{spec!r} is not a {NAME} dataset")
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, options.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in types:
                raise DataError(
                    f"--dataset {spec}: {item!r} is not an option; write {NAME}:key=value,... with keys "
                    f"{', '.join(types)}"
                )
            try:
                values[key] = float(value) if types[key] == "float" else int(value)
            except ValueError:
                raise DataError(f"--dataset {spec}: {key}={value!r} is not a number") from None
        return cls(**values)

    @property
    def spec(self) -> str:
        """The canonical ``--dataset`` string of this task (every option spelled out)."""
        return f"{NAME}:" + ",".join(f"{k}={v}" for k, v in asdict(self).items())

    @property
    def vocab_size(self) -> int:
        """Model vocabulary: the ordinary tokens and BOS."""
        return self.vocab + 1

    @cached_property
    def transition(self) -> np.ndarray:
        """(vocab, vocab) bigram probabilities over ordinary tokens (row: current token - 1)."""
        rng = np.random.default_rng([self.task_seed, 7919])
        rows = rng.dirichlet(np.full(self.vocab, self.sparsity), size=self.vocab)
        rows = np.maximum(rows, 0.0)  # Dirichlet with a tiny concentration can underflow to exact zeros
        rows[rows.sum(1) == 0] = 1.0
        return rows / rows.sum(1, keepdims=True)

    @cached_property
    def stationary(self) -> np.ndarray:
        """The chain's stationary distribution (without the copies), by power iteration from uniform."""
        p = np.full(self.vocab, 1.0 / self.vocab)
        for _ in range(1000):
            p = 0.5 * (p + p @ self.transition)  # lazy chain: converges even for periodic chains
        return p / p.sum()

    @cached_property
    def trigger_ids(self) -> np.ndarray:
        """Token ids (1..vocab) of the triggers: the most frequent tokens, ties broken by id."""
        order = np.lexsort((np.arange(self.vocab), -self.stationary))
        return np.sort(order[: self.triggers]) + 1

    def sequences(self, generators: list[np.random.Generator], seq_len: int) -> np.ndarray:
        """One sequence of ``seq_len`` tokens per generator: BOS, a first token from the stationary distribution
        without the triggers, then the chain, with a copy of token t-1 after a trigger at t >= 2."""
        rows = len(generators)
        uniform = np.stack([g.random(seq_len) for g in generators])
        cumulative = np.cumsum(self.transition, axis=1)
        cumulative[:, -1] = 1.0
        is_trigger = np.zeros(self.vocab + 1, dtype=bool)
        is_trigger[self.trigger_ids] = True
        out = np.empty((rows, seq_len), dtype=np.int64)
        out[:, 0] = BOS_ID
        if seq_len > 1:
            start = np.where(is_trigger[1:], 0.0, self.stationary)  # as Guo et al.: no trigger right after BOS
            first = np.cumsum(start / start.sum())
            first[-1] = 1.0
            out[:, 1] = np.searchsorted(first, uniform[:, 1], side="right") + 1
        for t in range(1, seq_len - 1):
            current = out[:, t]
            drawn = (cumulative[current - 1] < uniform[:, t + 1, None]).sum(1) + 1
            copy = is_trigger[current] & (t >= 2)
            out[:, t + 1] = np.where(copy, out[:, t - 1], drawn)
        return out

    def copy_positions(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions whose next token is a copy (a trigger at t >= 2): where the loss tests
        the copy head; elsewhere it tests the bigram."""
        mask = np.isin(ids, self.trigger_ids)
        mask[..., :2] = False
        return mask

    def tokenizer(self) -> Tokenizer:
        """The stand-in tokenizer the launcher expects: the task's vocabulary; it encodes no text."""

        def encode_batch(texts: list[str]) -> list[list[int]]:
            raise DataError(f"{NAME} has its own vocabulary and encodes no text; --tokenizer does not apply to it")

        # No EOS exists; BOS stands in where an EOS id is required (the model config), and never ends a sequence.
        return Tokenizer(self.spec, self.vocab_size, BOS_ID, encode_batch)


def is_bigram_backcopy(dataset: str) -> bool:
    return dataset.partition(":")[0] == NAME


class BigramBackcopyBatches:
    """Micro-batches of the task for one data-parallel rank, with :class:`~vscale_plugin.data.PackedBatches`'
    interface: iterate, ``check``, ``state_dict``/``load_state_dict``.

    ``split="train"`` is endless; ``split="eval"`` is ``eval_docs`` held-out sequences (whole rounds of one batch per
    rank), the same on every pass.
    """

    def __init__(
        self,
        dataset: str,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        eval_docs: int = 256,
    ) -> None:
        if seq_len < 2 or micro_batch < 1:
            raise DataError(f"{NAME}: seq_len {seq_len} must be at least 2 and micro_batch {micro_batch} at least 1")
        check_stream(rank, world_size, split)
        self.task = BigramBackcopy.parse(dataset)
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.split = split
        self.eval_docs = eval_docs
        self._next = 0  # the next training micro-batch of this rank

    def batch(self, n: int, split: int = _TRAIN) -> torch.Tensor:
        """This rank's ``n``-th micro-batch of a stream, ``(micro_batch, seq_len)`` int64."""
        first = (n * self.world_size + self.rank) * self.micro_batch
        generators = [np.random.default_rng([self.seed, split, i]) for i in range(first, first + self.micro_batch)]
        return torch.from_numpy(self.task.sequences(generators, self.seq_len))

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.split == "eval":
            for n in range(self._eval_rounds):
                yield self.batch(n, _EVAL)
            return
        while True:
            batch = self.batch(self._next)
            self._next += 1
            yield batch

    def documents(self) -> Iterator[np.ndarray]:
        """This rank's sequences one by one, in the order of its batches (each is a whole row, BOS first; padding
        them changes nothing): the training stream from the current position, or the eval split once."""
        for batch in self if self.split == "eval" else (self.batch(n) for n in itertools.count(self._next)):
            yield from batch.numpy()

    @property
    def _eval_rounds(self) -> int:
        return self.eval_docs // (self.world_size * self.micro_batch)

    def check(self) -> None:
        """A DataError now for an eval split too small for one batch per rank (eval/loss would measure nothing)."""
        if self.split == "eval" and self._eval_rounds == 0:
            raise DataError(
                f"{NAME}: its eval split of {self.eval_docs} sequences holds fewer than one batch per rank "
                f"({self.world_size} x {self.micro_batch}); lower --micro_batch"
            )

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "position": {"batch": self._next}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_stream(state, self._identity(), "the same dataset, seed, micro-batch and number of ranks")
        position = state.get("position")
        if not isinstance(position, dict) or not isinstance(position.get("batch"), int) or position["batch"] < 0:
            raise malformed_position(position)
        self._next = position["batch"]

    def _identity(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "dataset": self.task.spec,
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
        }
