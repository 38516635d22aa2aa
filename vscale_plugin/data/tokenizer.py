"""Tokenizers: a SentencePiece ``.model`` or a Hugging Face tokenizer behind one small interface, never adding BOS.

The paper packs documents with EOS as the only separator and no BOS, so :meth:`Tokenizer.encode` returns the
bare text tokens and the packer appends EOS. ``--dataset smoke`` without ``--tokenizer`` gets a small
SentencePiece model trained on the smoke corpus once and cached, so the smoke run needs no download.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vscale_plugin.data.errors import DataError
from vscale_plugin.data.hub import offline_for
from vscale_plugin.data.sources import smoke_documents

PAPER_TOKENIZER = "gpt2"
# Where trained tokenizers (the smoke corpus' SentencePiece model) are cached; VSP_CACHE overrides.
TOKENIZER_CACHE = Path(os.environ.get("VSP_CACHE", Path.home() / ".cache" / "vscale_plugin"))

# The smoke corpus supports a unigram vocabulary of about 4.6k pieces; 4096 trains in about a second.
# hard_vocab_limit=False keeps training from failing on a Python version whose help topics are a little smaller.
_SMOKE_TRAINING = {
    "model_type": "unigram",
    "vocab_size": 4096,
    "hard_vocab_limit": False,
    "character_coverage": 1.0,
    "byte_fallback": True,  # any text encodes, whatever characters the smoke corpus lacked
    "unk_id": 0,
    "eos_id": 1,
    "bos_id": -1,  # no BOS piece exists, so none can appear
    "pad_id": -1,
    "num_threads": 2,
    "minloglevel": 2,
}


class Tokenizer:
    """Text to token ids, with the facts the packer and the model need: ``vocab_size`` and ``eos_id``; and back
    (``decode``, for generated answers and bytes per token), where the tokenizer has text at all."""

    def __init__(
        self,
        name: str,
        vocab_size: int,
        eos_id: int,
        encode_batch: Callable[[list[str]], list[list[int]]],
        decode: Callable[[list[int]], str] | None = None,
        save: Callable[[Path], None] | None = None,
    ) -> None:
        if not 0 <= eos_id < vocab_size:
            raise DataError(
                f"tokenizer {name}: EOS id {eos_id} lies outside its vocabulary of {vocab_size}; use a tokenizer "
                "with an EOS token"
            )
        self.name = name
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._encode_batch = encode_batch
        self._decode = decode
        self._save = save

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts in one call, which both backends run much faster than one by one."""
        return self._encode_batch(list(texts))

    @property
    def has_text(self) -> bool:
        """False for a tokenizer of a synthetic vocabulary (bigram_backcopy), which has no text to decode to."""
        return self._decode is not None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens (EOS) decode to nothing."""
        if self._decode is None:
            raise DataError(f"tokenizer {self.name} has no text: its tokens decode to nothing")
        return self._decode([int(i) for i in ids])

    def save_pretrained(self, directory: str | Path) -> bool:
        """Write this tokenizer into ``directory`` as one ``transformers.AutoTokenizer.from_pretrained(directory)``
        loads, encoding text to the same ids as :meth:`encode` (with ``add_special_tokens=False``: the HF tokenizer's
        own BOS, if it has one, is its own). False, and nothing written, for a tokenizer without text."""
        if self._save is None:
            return False
        self._save(Path(directory))
        return True

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def build_tokenizer(spec: str | None, dataset: str, cache_dir: Path) -> Tokenizer:
    """The tokenizer for ``--tokenizer spec`` (``None``: the default for ``dataset``).

    ``spec`` ending in ``.model``: a SentencePiece file; any other ``spec``: a Hugging Face tokenizer name or
    directory, through ``transformers.AutoTokenizer``. Without ``spec``: for ``dataset == "smoke"`` a SentencePiece
    model trained on the smoke corpus and cached in ``cache_dir`` (trained once, reused after); for the synthetic
    ``bigram_backcopy`` its own vocabulary (no ``spec`` allowed); otherwise the paper's GPT-2 tokenizer.
    """
    from vscale_plugin.data.bigram_backcopy import BigramBackcopy, is_bigram_backcopy

    if is_bigram_backcopy(dataset):
        if spec is not None:
            raise DataError(f"--tokenizer {spec}: --dataset {dataset} has its own vocabulary and no text to "
                            "tokenize; drop --tokenizer")  # fmt: skip
        return BigramBackcopy.parse(dataset).tokenizer()
    if spec is None:
        if dataset == "smoke":
            return _smoke_tokenizer(Path(cache_dir))
        return _hugging_face(
            PAPER_TOKENIZER, f"the paper's tokenizer {PAPER_TOKENIZER} (default for --dataset {dataset})"
        )
    if spec.endswith(".model"):
        return _sentencepiece(Path(spec))
    return _hugging_face(spec, f"--tokenizer {spec}")


def _sentencepiece(path: Path, name: str | None = None) -> Tokenizer:
    import sentencepiece

    if not path.is_file():
        raise DataError(f"--tokenizer {path}: no such SentencePiece model file; pass an existing .model file")
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"--tokenizer {path}: not a SentencePiece model ({err}); pass a .model file") from err
    if processor.eos_id() < 0:
        raise DataError(
            f"--tokenizer {path}: the model has no EOS piece, which separates packed documents; train it with eos_id"
        )

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # add_bos/add_eos default to False here, whatever options the model was trained with.
        return processor.encode(texts, out_type=int, add_bos=False, add_eos=False)

    def decode(ids: list[int]) -> str:
        return processor.decode(ids)

    def save(directory: Path) -> None:
        sentencepiece_as_transformers(path).save_pretrained(directory)

    return Tokenizer(name or path.name, processor.get_piece_size(), processor.eos_id(), encode_batch, decode, save)


def sentencepiece_as_transformers(path: Path):
    """The SentencePiece model ``path`` as a transformers fast tokenizer (``tokenizer.json``) with its ids: the
    SentencePiece normaliser, dummy prefix and byte fallback, EOS its EOS piece, no BOS added.

    Two differences from a plain conversion keep the ids equal to ``SentencePieceProcessor.encode`` on any text:
    SentencePiece never matches its control, unknown and byte pieces (``</s>``, ``<unk>``, ``<0x41>``) in the text,
    so here they are never chosen by the Viterbi search either (a score far below any normal piece's) and the
    special tokens are not split out of the text (``split_special_tokens``). What stays: a unigram model's equally
    scored segmentations may be broken differently (not seen on the smoke corpus)."""
    import sentencepiece
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    proto = SentencePieceExtractor(str(path)).proto
    normal = 1  # sentencepiece_model.proto: ModelProto.SentencePiece.Type.NORMAL
    pieces = [(p.piece, p.score if p.type == normal else -1e6) for p in proto.pieces]
    unigram = proto.trainer_spec.model_type == 1
    vocab = pieces if unigram else {piece: i for i, (piece, _) in enumerate(pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    unk = processor.unk_id()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=processor.id_to_piece(processor.eos_id()),
        unk_token=processor.id_to_piece(unk) if unk >= 0 else None,
        bos_token=None,
        split_special_tokens=True,
    )


def _hugging_face(spec: str, label: str) -> Tokenizer:
    from transformers import AutoTokenizer

    local = Path(spec).expanduser()
    if not local.exists() and spec.startswith((".", "/", "~")):
        raise DataError(
            f"{label}: no such directory; pass a directory with tokenizer files, a Hugging Face "
            "tokenizer name (e.g. gpt2) or a SentencePiece .model file"
        )
    # A hub name with the hub out of reach: the local cache only, which answers at once instead of after retries.
    offline = offline_for(spec)
    try:
        hf = AutoTokenizer.from_pretrained(str(local) if local.exists() else spec, local_files_only=offline is not None)
    except (OSError, ValueError) as err:
        cause = str(err).splitlines()[0]
        if offline is not None:
            cause = f"not in the local Hugging Face cache, and the hub cannot be reached: {offline}"
        raise DataError(
            f"{label}: cannot load this Hugging Face tokenizer ({cause}). Pass a local tokenizer directory or a "
            f"SentencePiece .model file with --tokenizer, or download it once with network (`hf download {spec}`)"
        ) from err
    if hf.eos_token_id is None:
        raise DataError(f"{label}: has no EOS token, which separates packed documents; choose a tokenizer with one")

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # add_special_tokens=False: no BOS (Llama-style tokenizers add one by default). verbose=False: documents
        # longer than model_max_length are expected here, since packing cuts them into windows.
        return hf(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    def decode(ids: list[int]) -> str:
        return hf.decode(ids, skip_special_tokens=True)

    def save(directory: Path) -> None:
        hf.save_pretrained(directory)

    return Tokenizer(spec, len(hf), hf.eos_token_id, encode_batch, decode, save)


def _smoke_tokenizer(cache_dir: Path) -> Tokenizer:
    import sentencepiece

    documents = smoke_documents()
    digest = hashlib.sha256(repr(sorted(_SMOKE_TRAINING.items())).encode())
    for document in documents:
        digest.update(document.encode())
    path = (
        cache_dir
        / f"smoke-{_SMOKE_TRAINING['model_type']}{_SMOKE_TRAINING['vocab_size']}-{digest.hexdigest()[:16]}.model"
    )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Ranks that start together wait for one of them to train; the others then read its file.
        with open(cache_dir / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                model = io.BytesIO()
                lines = (line for document in documents for line in document.splitlines() if line.strip())
                sentencepiece.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **_SMOKE_TRAINING)
                partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                partial.write_bytes(model.getvalue())
                os.replace(partial, path)
    except OSError as err:
        raise DataError(
            f"cannot write the smoke tokenizer to {cache_dir} ({err}); make that directory writable or pass "
            "--tokenizer with an existing SentencePiece .model file"
        ) from err
    return _sentencepiece(path, name=f"smoke:{path.name}")


def check_fits(tokenizer: Tokenizer, vocab_size: int, model: str, fix: str, error: type[Exception] = DataError) -> None:
    """``error`` when ``tokenizer`` makes ids that ``model`` (named so in the message), with ``vocab_size`` embeddings,
    cannot look up; ``fix`` says what to pass instead. A smaller tokenizer is fine (padded vocabularies)."""
    if tokenizer.vocab_size > vocab_size:
        raise error(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but {model} has {vocab_size} embeddings; "
            f"{fix}"
        )
