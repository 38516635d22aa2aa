"""RULER-style needle in a haystack (SPEC section 7), generated locally and deterministically from a seed.

The paper's long-context tables use three RULER tasks (Hsieh et al. 2024): ``niah_single_2`` (one word key, a
7-digit number value, essay haystack), ``niah_single_3`` (the same with a UUID value) and ``niah_multikey_1`` (four
word-key/number needles, one asked). RULER's generator downloads essays and random words; here the haystack is the
evaluation corpus' documents, the keys come from a built-in word list and the values from a seeded RNG, so a run is
reproducible offline. The prompt is built from separately encoded pieces (template, haystack sentences, needles) so
that its length in tokens is exact: it fills the context up to the answer's tokens. The model answers by greedy
decoding through its KV cache; an answer counts when the value is a case-insensitive substring of it.
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vscale_plugin.data import Tokenizer

TASKS: tuple[str, ...] = ("niah_single_2", "niah_single_3", "niah_multikey_1")

# (value kind, needles per prompt) of each task, after RULER's synthetic.yaml.
_TASK_SPECS: dict[str, tuple[str, int]] = {
    "niah_single_2": ("number", 1),
    "niah_single_3": ("uuid", 1),
    "niah_multikey_1": ("number", 4),
}

# RULER draws its keys as random adjective-noun pairs ("wonderwords"); a fixed list keeps this module offline.
_ADJECTIVES = (
    "amber", "ancient", "brave", "bright", "calm", "clever", "crimson", "curious", "distant", "eager", "fierce",
    "gentle", "golden", "hidden", "hollow", "humble", "icy", "jolly", "lively", "lonely", "lucky", "mellow",
    "misty", "noble", "patient", "quiet", "rapid", "rustic", "silent", "silver", "sturdy", "velvet",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "beacon", "canyon", "castle", "cedar", "comet", "falcon", "garden", "glacier", "harbor",
    "island", "lantern", "meadow", "mirror", "orchard", "otter", "pebble", "pepper", "pilgrim", "quarry", "raven",
    "river", "saddle", "thimble", "thistle", "tunnel", "violin", "walnut", "willow", "window", "zephyr",
)  # fmt: skip
WORD_KEYS: tuple[str, ...] = tuple(f"{adjective}-{noun}" for adjective in _ADJECTIVES for noun in _NOUNS)

# RULER's templates; {noun} is "number" or "uuid", {nouns} its plural.
_PREFIX = (
    "Some special magic {nouns} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {nouns} afterwards.\n"
)
_NEEDLE = "One of the special magic {nouns} for {key} is: {value}."
_QUESTION = (
    "\nWhat is the special magic {noun} for {key} mentioned in the provided text? "
    "The special magic {noun} for {key} mentioned in the provided text is"
)

# Sentence ends, where needles go: after ., ! or ? followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Longer sentences (tables and code in the smoke corpus have few full stops) are cut into pieces of this many words,
# so that a word boundary is always near where no sentence boundary is.
_PIECE_WORDS = 32
# A needle goes to the nearest sentence boundary within this fraction of the haystack (or _SNAP_TOKENS tokens,
# whichever is more) of its depth, else to the nearest word boundary between pieces.
_SNAP_FRACTION = 0.05
_SNAP_TOKENS = 16
# Tokens of generation beyond the longest value's: room for a leading space or colon before the value.
_ANSWER_MARGIN = 4


class ContextTooShort(ValueError):
    """The context cannot hold the task's template, needles and answer: the cell is skipped, not failed."""


@dataclass(frozen=True)
class Sample:
    task: str
    input_ids: list[int]  # the prompt, without BOS or EOS
    answer: str  # the asked needle's value
    depth: float  # where the asked needle sits: haystack tokens before it / all haystack tokens, 0..1


def check_task(name: str) -> str:
    """``name`` if it is a NIAH task; ValueError listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"NIAH task {name!r} does not exist; available: {', '.join(TASKS)}")
    return name


def _check_text(tokenizer: Tokenizer) -> None:
    if not tokenizer.has_text:
        raise ValueError(
            f"tokenizer {tokenizer.name} has no text (a synthetic vocabulary such as bigram_backcopy's): needle in "
            "a haystack needs a text tokenizer and a text corpus"
        )


def _nouns(kind: str) -> tuple[str, str]:
    return ("number", "numbers") if kind == "number" else ("uuid", "uuids")


def _draw_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER's 7-digit numbers
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))  # a version-4 UUID, from the seeded RNG


def max_new_tokens(task: str, tokenizer: Tokenizer) -> int:
    """Tokens to generate for an answer of ``task``: the longest of 32 fixed sample values in ``tokenizer``'s
    tokens, plus a small margin."""
    kind, _ = _TASK_SPECS[check_task(task)]
    _check_text(tokenizer)
    rng = random.Random(f"max_new_tokens/{kind}")
    values = [_draw_value(kind, rng) for _ in range(32)]
    return max(len(ids) for ids in tokenizer.encode_batch([" " + value for value in values])) + _ANSWER_MARGIN


@dataclass
class _Pieces:
    """Haystack text as pieces of at most _PIECE_WORDS words, each encoded with a leading space."""

    tokens: list[list[int]]
    ends_sentence: list[bool]
    text: str


class _Haystack:
    """The documents as pieces of tokens, tokenized one document at a time when first needed."""

    def __init__(self, tokenizer: Tokenizer, documents: Sequence[str]) -> None:
        if len(documents) == 0:
            raise ValueError("NIAH needs haystack documents; the evaluation corpus gave none")
        self.tokenizer = tokenizer
        self.documents = documents
        self._pieces: dict[int, _Pieces] = {}

    def document(self, index: int) -> _Pieces:
        """Document ``index`` with whitespace collapsed (essay-like prose), in pieces."""
        if index not in self._pieces:
            texts, ends = [], []
            for sentence in _SENTENCE_END.split(self.documents[index]):
                words = sentence.split()
                for start in range(0, len(words), _PIECE_WORDS):
                    texts.append(" ".join(words[start : start + _PIECE_WORDS]))
                    ends.append(start + _PIECE_WORDS >= len(words))
            # A leading space, as each piece follows another in running text.
            tokens = self.tokenizer.encode_batch([" " + text for text in texts]) if texts else []
            self._pieces[index] = _Pieces(tokens, ends, " ".join(texts))
        return self._pieces[index]

    def take(self, start: int, budget: int) -> _Pieces:
        """Pieces from document ``start`` on, cycling through the documents (repeating them when all of them
        together are shorter), until ``budget`` tokens; the last piece cut to fit."""
        taken = _Pieces([], [], "")
        texts: list[str] = []
        total, empty_run = 0, 0
        for index in itertools.cycle([*range(start, len(self.documents)), *range(start)]):
            if total >= budget:
                break
            document = self.document(index)
            empty_run = 0 if any(document.tokens) else empty_run + 1
            if empty_run >= len(self.documents):
                raise ValueError("NIAH haystack: the evaluation corpus' documents contain no text")
            texts.append(document.text)
            for tokens, ends in zip(document.tokens, document.ends_sentence, strict=True):
                if total >= budget:
                    break
                tokens = tokens[: budget - total]
                taken.tokens.append(tokens)
                taken.ends_sentence.append(ends)
                total += len(tokens)
        taken.text = " ".join(texts)
        return taken


def _insertion_point(pieces: _Pieces, depth: float) -> int:
    """The haystack token offset for a needle at ``depth``: the nearest sentence boundary where one is close, else
    the nearest boundary between pieces (a word boundary)."""
    offsets = [0, *itertools.accumulate(map(len, pieces.tokens))]
    total = offsets[-1]
    target = depth * total

    def nearest(boundaries: list[int]) -> int:
        i = bisect.bisect_left(boundaries, target)
        return min(boundaries[max(i - 1, 0) : i + 1], key=lambda b: abs(b - target))

    # The haystack's start and end border the template, which is as good as a sentence end.
    sentence_ends = [0] + [offsets[k + 1] for k, ends in enumerate(pieces.ends_sentence) if ends] + [total]
    best = nearest(sentence_ends)
    if abs(best - target) <= max(_SNAP_FRACTION * total, _SNAP_TOKENS):
        return best
    return nearest(offsets)


def make_samples(
    task: str, tokenizer: Tokenizer, haystack: Sequence[str], context: int, samples: int, seed: int
) -> list[Sample]:
    """``samples`` prompts of ``task`` for a context of ``context`` tokens, the same for the same arguments.

    Each prompt is RULER's template around haystack text with the needles in it: ``len(input_ids) +
    max_new_tokens(task, tokenizer) == context`` exactly, the haystack's tokens cut to fit. Sample ``i`` asks the
    needle placed at depth ``(i + 0.5) / samples`` of the haystack, so the asked depths spread evenly over the
    context; the other needles (``niah_multikey_1``) go to seeded random depths. A needle goes in at a sentence
    boundary of the haystack where one is near its depth, else at a word boundary. The haystack of each sample is
    read from a seed-dependent document on, through the following documents in order, and starts over at the first
    document (repeating text) when all of them together are too short to fill the context. Keys are distinct
    adjective-noun words, values distinct and absent from the haystack text.

    Raises ValueError for an unknown task, a tokenizer without text, no haystack text, ``samples < 1``, or a
    context too small for the template and needles alone.
    """
    kind, n_needles = _TASK_SPECS[check_task(task)]
    _check_text(tokenizer)
    if samples < 1:
        raise ValueError(f"NIAH samples must be at least 1, got {samples}")
    noun, nouns = _nouns(kind)
    answer_tokens = max_new_tokens(task, tokenizer)
    prefix = tokenizer.encode(_PREFIX.format(nouns=nouns))
    hay = _Haystack(tokenizer, haystack)
    rng = random.Random(f"niah/{task}/{context}/{samples}/{seed}")
    result = []
    for i in range(samples):
        keys = rng.sample(WORD_KEYS, n_needles)
        asked = rng.randrange(n_needles)
        depths = [rng.random() for _ in range(n_needles)]
        depths[asked] = (i + 0.5) / samples
        start = rng.randrange(len(haystack))
        # Needle lengths depend on the values, which must avoid the haystack's text: draw, measure, redraw.
        values = [_draw_value(kind, rng) for _ in range(n_needles)]
        question = tokenizer.encode(_QUESTION.format(noun=noun, key=keys[asked]))
        for _attempt in range(100):
            needles = tokenizer.encode_batch(
                [" " + _NEEDLE.format(nouns=nouns, key=k, value=v) for k, v in zip(keys, values, strict=True)]
            )
            budget = context - answer_tokens - len(prefix) - len(question) - sum(map(len, needles))
            if budget < 0:
                raise ContextTooShort(
                    f"NIAH {task}: context {context} is too small: the template, needles and answer alone take "
                    f"{context - budget} tokens; use a context of at least that"
                )
            pieces = hay.take(start, budget)
            clashes = [j for j, v in enumerate(values) if v in pieces.text or values.index(v) != j]
            if not clashes:
                break
            for j in clashes:
                values[j] = _draw_value(kind, rng)
        else:
            raise ValueError(f"NIAH {task}: cannot draw needle values absent from the haystack text")
        haystack_ids = [t for tokens in pieces.tokens for t in tokens]
        points = [_insertion_point(pieces, d) for d in depths]
        ids = list(prefix)
        previous = 0
        for j in sorted(range(n_needles), key=lambda j: (points[j], j)):
            ids += haystack_ids[previous : points[j]] + needles[j]
            previous = points[j]
        ids += haystack_ids[previous:] + question
        depth = points[asked] / len(haystack_ids) if haystack_ids else depths[asked]
        result.append(Sample(task=task, input_ids=ids, answer=values[asked], depth=depth))
    return result


def _device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def greedy_generate(
    model: nn.Module, input_ids: list[int] | torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """The tokens ``model`` generates greedily after ``input_ids`` (one prompt), at most ``max_new_tokens``; see
    :func:`greedy_generate_batch`."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"greedy_generate takes one non-empty prompt, got input_ids of shape {tuple(ids.shape)}")
    return greedy_generate_batch(model, ids[None], max_new_tokens, eos_id)[0]


@torch.no_grad()
def greedy_generate_batch(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> list[list[int]]:
    """The tokens ``model`` generates greedily after each row of ``input_ids`` (prompts of one length, so no padding
    and the same positions in every row), at most ``max_new_tokens`` per row.

    One forward of the prompts with ``use_cache=True``, then one token per row at a time with the KV cache it
    returned, on the model's device. A row stops at ``eos_id``, which is not returned (rows that stopped are still
    computed until every row has, and their tokens dropped). ``model`` is anything that takes ``input_ids``,
    ``past_key_values`` and ``use_cache`` and returns ``.logits`` and ``.past_key_values`` (an HF causal LM; in
    transformers versions that renamed it, ``cache`` instead of ``past_key_values``).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=_device(model))
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"greedy_generate_batch takes (batch, length) prompts, got shape {tuple(ids.shape)}")
    parameters = inspect.signature(model.forward).parameters
    # Recent transformers (5.24) name the KV cache `cache`, argument and output, deprecating past_key_values.
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    # The prompt's logits are needed at its last position only; HF models can skip computing the others.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    generated: list[list[int]] = [[] for _ in range(ids.shape[0])]
    running = [True] * ids.shape[0]
    step = ids
    cache = None
    for _ in range(max_new_tokens):
        out = model(input_ids=step, use_cache=True, **{cache_name: cache}, **keep)
        cache = getattr(out, cache_name)
        tokens = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if running[row]:
                if token == eos_id:
                    running[row] = False
                else:
                    generated[row].append(token)
        if not any(running):
            break
        step = tokens[:, None]
    return generated


def score(generated: str, answer: str) -> bool:
    """RULER's string match: ``answer`` occurs in ``generated``, case-insensitively."""
    if not answer:
        raise ValueError("NIAH answer is empty; every generation would contain it")
    return answer.lower() in generated.lower()


def evaluate_niah(model: nn.Module, tokenizer: Tokenizer, samples: Sequence[Sample], batch_size: int = 8) -> float:
    """Accuracy of ``model`` on ``samples``: the fraction whose greedy answer contains the value. Samples of one
    task and prompt length (all of one ``make_samples`` call) are decoded ``batch_size`` at a time."""
    if len(samples) == 0:
        raise ValueError("evaluate_niah needs at least one sample")
    if batch_size < 1:
        raise ValueError(f"evaluate_niah batch_size must be at least 1, got {batch_size}")
    _check_text(tokenizer)
    groups: dict[tuple[str, int], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.task, len(sample.input_ids)), []).append(sample)
    correct = 0
    for (task, _), group in groups.items():
        budget = max_new_tokens(task, tokenizer)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            prompts = torch.tensor([sample.input_ids for sample in chunk], dtype=torch.long)
            answers = greedy_generate_batch(model, prompts, budget, tokenizer.eos_id)
            correct += sum(score(tokenizer.decode(ids), s.answer) for ids, s in zip(answers, chunk, strict=True))
    return correct / len(samples)
