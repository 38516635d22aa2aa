"""The data pipeline: tokenizers, sources in every format, packing with EOS and no BOS, rank split, exact resume.

Packed streams are checked against an independent re-tokenisation: the SentencePiece processor called on one
document at a time, never the pipeline's batched encoder.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece
import torch

from vscale_plugin.data import (
    DataError,
    PackedBatches,
    Tokenizer,
    build_tokenizer,
    packing,
    padded_batches,
    smoke_documents,
    sources,
)

C4_SAMPLE = Path(__file__).resolve().parent / "data" / "c4-sample.jsonl"  # real C4 (ODC-BY), see tests/data/README.md


def _sample_texts() -> list[str]:
    return [json.loads(line)["text"] for line in C4_SAMPLE.read_text().splitlines()]


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="session")
def tok(tok_cache) -> Tokenizer:
    return build_tokenizer(None, "smoke", tok_cache)


@pytest.fixture(scope="session")
def reference(tok_cache):
    """Encodes one text at a time with SentencePiece itself: independent of the pipeline's batched encoder."""
    (model,) = tok_cache.glob("*.model")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    return lambda text: processor.encode(text, out_type=int)


@pytest.fixture
def c4_from_sample(monkeypatch):
    """``--dataset c4`` served by the real C4 code, reading the local sample instead of the hub."""
    monkeypatch.setattr(sources, "open_c4", functools.partial(sources.open_c4, data_files=str(C4_SAMPLE)))
    return "c4"


@pytest.fixture
def offline(monkeypatch):
    """Fail hub requests at once instead of after the hub client's retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _stream(batches: Iterable[torch.Tensor]) -> np.ndarray:
    return np.concatenate([b.reshape(-1).numpy() for b in batches]) if batches else np.empty(0, np.int64)


def _segments(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """Complete documents (tokens before each EOS); the unfinished tail is left out."""
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(stream[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def _index(texts: list[str], reference) -> dict[tuple[int, ...], int]:
    index = {tuple(reference(text)): i for i, text in enumerate(texts)}
    assert len(index) == len(texts), "test documents must tokenise to distinct sequences"
    return index


def _epoch_token_docs(data: PackedBatches, epoch: int = 0) -> list[tuple[int, ...]]:
    """The documents (tokens without EOS) one rank trains on in ``epoch``, in order: the pipeline's own stream."""
    documents = []
    for tokens, position in data._train_documents(packing._Position()):
        if position.epoch > epoch:
            return documents
        if position.epoch == epoch:
            documents.append(tuple(tokens[:-1].tolist()))
    raise AssertionError("unreachable: training streams are endless")


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """30 distinct short documents of real English (slices of the smoke corpus)."""
    corpus = " ".join(smoke_documents()).split()
    return [f"Document {i}: " + " ".join(corpus[i * 40 : i * 40 + 20 + i]) for i in range(30)]


# --- tokenizers ---------------------------------------------------------------------------------------------------


def test_smoke_documents_ship_with_python():
    documents = smoke_documents()
    assert len(documents) > 50
    assert sum(map(len, documents)) > 200_000
    assert all(isinstance(d, str) and d.strip() for d in documents)
    assert len(set(documents)) == len(documents)
    assert documents == smoke_documents()


def test_smoke_tokenizer_is_trained_once_and_cached(tmp_path, monkeypatch):
    first = build_tokenizer(None, "smoke", tmp_path)
    (model,) = tmp_path.glob("*.model")
    stamp = model.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached smoke tokenizer must be reused, not retrained")

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", no_training)
    second = build_tokenizer(None, "smoke", tmp_path)
    assert model.stat().st_mtime_ns == stamp
    assert second.name == first.name and second.vocab_size == first.vocab_size
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".model"], "no partial files left behind"


def test_smoke_tokenizer_vocabulary_is_sane(tok, reference):
    assert 1000 < tok.vocab_size <= 4096
    assert 0 <= tok.eos_id < tok.vocab_size
    ids = tok.encode(" ".join(smoke_documents()[:5]) + " Ünïcödé ✓ 漢字")
    assert ids and max(ids) < tok.vocab_size and min(ids) >= 0
    assert tok.eos_id not in ids
    assert tok.encode("") == []
    texts = _sample_texts()[:20]
    assert tok.encode_batch(texts) == [reference(t) for t in texts]


def test_sentencepiece_model_file_is_a_tokenizer_spec(tok, tok_cache):
    (model,) = tok_cache.glob("*.model")
    from_file = build_tokenizer(str(model), "c4", tok_cache)
    assert from_file.name == model.name
    assert (from_file.vocab_size, from_file.eos_id) == (tok.vocab_size, tok.eos_id)
    assert from_file.encode("The paper packs documents.") == tok.encode("The paper packs documents.")
    assert sentencepiece.SentencePieceProcessor(model_file=str(model)).bos_id() == -1, "the smoke model has no BOS"


def test_decode_inverts_encode_and_drops_eos(tok, hf_dir_with_bos, tmp_path):
    text = "The needle is 4711203 and b8a3e9f2-1c4d."
    hf = build_tokenizer(str(hf_dir_with_bos), "smoke", tmp_path)
    for tokenizer in (tok, hf):
        assert tokenizer.has_text
        ids = tokenizer.encode(text)
        assert tokenizer.decode([*ids, tokenizer.eos_id]) == text
    synthetic = build_tokenizer(None, "bigram_backcopy", tmp_path)
    assert not synthetic.has_text
    with pytest.raises(DataError, match="has no text"):
        synthetic.decode([1, 2])


@pytest.fixture(scope="session")
def hf_dir_with_bos(tmp_path_factory) -> Path:
    """A local Hugging Face tokenizer that adds BOS by default, as Llama's does."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        smoke_documents()[:20], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        path
    )
    return path


def test_hf_tokenizer_directory_never_adds_bos(hf_dir_with_bos, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir_with_bos))
    assert hf("some text")["input_ids"][0] == hf.bos_token_id, "precondition: this tokenizer adds BOS by default"
    tok = build_tokenizer(str(hf_dir_with_bos), "smoke", tmp_path)
    assert (tok.vocab_size, tok.eos_id) == (len(hf), hf.eos_token_id)
    assert tok.encode("some text") == hf("some text", add_special_tokens=False)["input_ids"]
    batches = list(islice(PackedBatches("smoke", tok, seq_len=64, micro_batch=4), 20))
    stream = _stream(batches)
    assert hf.bos_token_id not in stream
    assert (stream == tok.eos_id).sum() > 0


def test_hf_tokenizer_unavailable_offline_is_a_data_error(offline, tmp_path):
    with pytest.raises(DataError, match=r"--tokenizer gpt2: cannot load.*local tokenizer directory.*\.model"):
        build_tokenizer("gpt2", "c4", tmp_path)
    with pytest.raises(DataError, match=r"paper's tokenizer gpt2 \(default for --dataset c4\).*\.model"):
        build_tokenizer(None, "c4", tmp_path)


def test_tokenizer_spec_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.model: no such SentencePiece model file; pass an existing"):
        build_tokenizer(str(tmp_path / "nope.model"), "smoke", tmp_path)
    with pytest.raises(DataError, match=r"no such directory; pass a directory with tokenizer files"):
        build_tokenizer(str(tmp_path / "no_tokenizer_here"), "smoke", tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"junk\.model: not a SentencePiece model"):
        build_tokenizer(str(tmp_path / "junk.model"), "smoke", tmp_path)


def test_unwritable_cache_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"cannot write the smoke tokenizer.*--tokenizer"):
        build_tokenizer(None, "smoke", blocker / "cache")


# --- packing -----------------------------------------------------------------------------------------------------


def test_eval_windows_are_exactly_the_documents_with_eos_cut_at_seq_len(tok, reference):
    seq_len, micro_batch = 64, 4
    data = PackedBatches(str(C4_SAMPLE), tok, seq_len, micro_batch, split="eval")
    batches = list(data)
    held = len(_sample_texts()) // 10  # 800 documents: a tenth held out, the first ones in file order
    expected = np.concatenate([[*reference(t), tok.eos_id] for t in _sample_texts()[:held]])
    assert len(batches) == len(expected) // (seq_len * micro_batch), "only the incomplete last batch is dropped"
    assert all(b.shape == (micro_batch, seq_len) and b.dtype == torch.int64 for b in batches)
    stream = _stream(batches)
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert [b.tolist() for b in data] == [b.tolist() for b in batches], "every eval pass is the same"


@pytest.mark.parametrize("dataset", ["smoke", "c4", "sample"])
def test_train_windows_are_whole_documents_each_followed_by_eos(dataset, tok, reference, c4_from_sample):
    texts = {"smoke": smoke_documents(), "c4": _sample_texts(), "sample": _sample_texts()}[dataset]
    data = PackedBatches(str(C4_SAMPLE) if dataset == "sample" else dataset, tok, 128, 4)
    epoch0 = _epoch_token_docs(data)
    expected_eos = np.cumsum([len(d) + 1 for d in epoch0]) - 1
    total = int(expected_eos[-1]) + 1
    stream = _stream(list(islice(data, -(-total // 512))))[:total]
    np.testing.assert_array_equal(np.flatnonzero(stream == tok.eos_id), expected_eos)
    index = _index(texts, reference)
    seen = [index[s] for s in _segments(stream, tok.eos_id)]
    assert len(seen) == len(set(seen)) == len(epoch0), "each document exactly once per epoch, none dropped"
    assert sum(len(reference(texts[i])) + 1 for i in seen) == total
    assert seen != sorted(seen), "training order is shuffled"


def test_documents_that_do_not_fit_carry_over_across_batches_and_epochs(tmp_path, tok, reference, small_texts):
    path = _write_jsonl(tmp_path / "d.jsonl", small_texts)
    data = PackedBatches(str(path), tok, seq_len=7, micro_batch=3)  # 21 tokens: windows cut documents anywhere
    epochs = [_epoch_token_docs(data, e) for e in range(3)]
    expected = np.concatenate([[*d, tok.eos_id] for e in epochs for d in e])
    stream = _stream(list(islice(data, len(expected) // 21)))
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]), "every epoch holds the same documents"
    assert epochs[0] != epochs[1], "each epoch is reshuffled"


def test_empty_documents_add_no_lone_eos(tmp_path, tok, small_texts):
    texts = small_texts[:]
    texts[5] = texts[17] = ""
    data = PackedBatches(str(_write_jsonl(tmp_path / "d.jsonl", texts)), tok, 16, 2)
    stream = _stream(list(islice(data, 100)))
    assert () not in _segments(stream, tok.eos_id)


# --- ranks, seeds, resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "world_size", "by_shard"),
    [("smoke", 2, True), ("smoke", 3, True), ("c4", 2, False), ("c4", 3, False)],
    ids=["64 shards on 2", "64 shards on 3 (uneven)", "1 file on 2", "1 file on 3"],
)
def test_ranks_see_disjoint_documents_that_cover_the_data_every_epoch(
    dataset, world_size, by_shard, tok, c4_from_sample
):
    ranks = [PackedBatches(dataset, tok, 32, 2, rank=r, world_size=world_size) for r in range(world_size)]
    assert ranks[0]._by_shard == by_shard
    whole = PackedBatches(dataset, tok, 32, 2)
    for epoch in range(2):
        per_rank = [_epoch_token_docs(r, epoch) for r in ranks]
        assert all(per_rank), "every rank gets documents"
        together = [d for docs in per_rank for d in docs]
        assert len(set(together)) == len(together), "no document on two ranks"
        assert sorted(together) == sorted(_epoch_token_docs(whole, epoch))


def test_ranks_get_different_batches(tok, c4_from_sample):
    first = [next(iter(PackedBatches("c4", tok, 64, 2, rank=r, world_size=2))) for r in range(2)]
    assert not torch.equal(first[0], first[1])


def test_a_seed_fixes_the_batches_and_another_seed_changes_them(tok, c4_from_sample):
    def batches(seed: int) -> list[torch.Tensor]:
        return list(islice(PackedBatches("c4", tok, 64, 2, rank=1, world_size=2, seed=seed), 10))

    same, again, other = batches(3), batches(3), batches(4)
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other, strict=True))


@pytest.mark.parametrize("dataset", ["tiny_dir", "smoke", "c4"])
def test_resume_continues_exactly_where_the_state_was_taken(dataset, tok, tmp_path, small_texts, c4_from_sample):
    """From every batch of several epochs: a fresh object loading the (JSON round-tripped) state continues alike."""
    if dataset == "tiny_dir":
        for n, part in enumerate((small_texts[:7], small_texts[7:20], small_texts[20:])):
            _write_jsonl(tmp_path / f"part{n}.jsonl", part)
    seq_len, micro_batch, steps = {"tiny_dir": (16, 3, 150), "smoke": (256, 8, 100), "c4": (1024, 8, 110)}[dataset]
    path = str(tmp_path) if dataset == "tiny_dir" else dataset

    def fresh() -> PackedBatches:
        return PackedBatches(path, tok, seq_len, micro_batch, rank=1, world_size=2, seed=7)

    straight = fresh()
    batches, states = [], [json.dumps(straight.state_dict())]
    for batch in islice(straight, steps):
        batches.append(batch)
        states.append(json.dumps(straight.state_dict()))
    epochs = [json.loads(s)["position"]["epoch"] for s in states]
    crossings = [k for k in range(1, len(epochs)) if epochs[k] != epochs[k - 1]]
    assert len(crossings) >= 2, "the stream must cross epoch boundaries"
    ahead = 3
    starts = {*range(0, steps, 7), *(k - 1 for k in crossings), *crossings}
    for k in sorted(k for k in starts if k + ahead <= steps):
        resumed = fresh()
        resumed.load_state_dict(json.loads(states[k]))
        for expected, got in zip(batches[k : k + ahead], islice(resumed, ahead), strict=True):
            assert torch.equal(expected, got), f"resuming after batch {k} diverged"
        assert resumed.state_dict() == json.loads(states[k + ahead])


def test_resume_into_another_stream_is_refused(tok, c4_from_sample):
    state = PackedBatches("c4", tok, 64, 2, rank=0, world_size=2).state_dict()
    other = PackedBatches("c4", tok, 64, 2, rank=0, world_size=4)
    with pytest.raises(DataError, match=r"world_size=2 \(now 4\).*same dataset, tokenizer, seed and number of ranks"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        PackedBatches("c4", tok, 64, 2, rank=0, world_size=2).load_state_dict({**state, "position": {"epoch": 1}})


# --- eval ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["smoke", "sample"])
def test_eval_slice_of_local_data_is_never_trained_on(dataset, tok, reference):
    texts = smoke_documents() if dataset == "smoke" else _sample_texts()
    dataset = str(C4_SAMPLE) if dataset == "sample" else dataset
    held = len(texts) // 10
    index = _index(texts, reference)
    train = PackedBatches(dataset, tok, 64, 2)
    trained = {index[d] for d in _epoch_token_docs(train)}
    assert trained == set(range(held, len(texts)))
    evaluated = {
        index[s] for s in _segments(_stream(list(PackedBatches(dataset, tok, 64, 2, split="eval"))), tok.eos_id)
    }
    assert evaluated and evaluated <= set(range(held))


def test_eval_docs_caps_the_held_out_slice(tok, reference):
    index = _index(_sample_texts(), reference)
    train = PackedBatches(str(C4_SAMPLE), tok, 64, 2, eval_docs=30)  # 800 documents hold 10 x 30: cap applies
    assert {index[d] for d in _epoch_token_docs(train)} == set(range(30, 800))


def test_eval_ranks_get_equal_disjoint_shares_of_the_same_batches(tok, c4_from_sample):
    whole = list(PackedBatches("c4", tok, 128, 2, split="eval"))
    per_rank = [list(PackedBatches("c4", tok, 128, 2, rank=r, world_size=3, split="eval")) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(whole) // 3
    for r, batches in enumerate(per_rank):
        assert all(torch.equal(b, whole[3 * i + r]) for i, b in enumerate(batches))


def test_documents_are_the_eval_documents_with_eos_split_between_ranks(tok, reference):
    held = len(_sample_texts()) // 10
    expected = [[*reference(t), tok.eos_id] for t in _sample_texts()[:held]]
    whole = [d.tolist() for d in PackedBatches(str(C4_SAMPLE), tok, 64, 2, split="eval").documents()]
    assert whole == expected
    shares = [
        [d.tolist() for d in PackedBatches(str(C4_SAMPLE), tok, 64, 2, rank=r, world_size=2, split="eval").documents()]
        for r in range(2)
    ]
    assert shares == [expected[0::2], expected[1::2]]


def test_train_documents_follow_the_training_stream(tok, small_texts, tmp_path):
    data = PackedBatches(str(_write_jsonl(tmp_path / "d.jsonl", small_texts * 10)), tok, 64, 2)
    first = [tuple(d[:-1].tolist()) for d in islice(data.documents(), 40)]
    assert first == _epoch_token_docs(data)[:40]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_hold_one_cut_document_per_row_with_its_mask(side):
    docs = [np.arange(n, dtype=np.int64) + 10 for n in (5, 9, 3, 20, 7)]
    batches = list(padded_batches(docs, batch_size=2, seq_len=8, side=side, pad_id=0))
    assert len(batches) == 2, "the incomplete last batch is dropped"
    for (ids, mask), pair in zip(batches, [docs[0:2], docs[2:4]], strict=True):
        width = max(min(len(d), 8) for d in pair)
        assert ids.shape == mask.shape == (2, width) and ids.dtype == mask.dtype == torch.int64
        for row, doc in enumerate(pair):
            real = ids[row][mask[row].bool()]
            assert real.tolist() == doc[:8].tolist(), "the document's first seq_len tokens, in order"
            assert (ids[row][~mask[row].bool()] == 0).all()
            first_real = int(mask[row].argmax())
            assert first_real == (width - len(real) if side == "left" else 0)
    with pytest.raises(DataError, match="padding side 'middle'"):
        next(padded_batches(docs, 2, 8, "middle", 0))


# --- C4 and every input format ------------------------------------------------------------------------------------


def test_c4_code_path_reads_the_sample_with_the_c4_schema(tok, reference, c4_from_sample):
    texts = _sample_texts()
    index = _index(texts, reference)
    source = sources.open_dataset("c4", "train")
    assert not source.holdout, "C4 has its own validation split"
    assert {index[d] for d in _epoch_token_docs(PackedBatches("c4", tok, 64, 2))} == set(range(len(texts)))
    evaluated = [index[s] for s in _segments(_stream(list(PackedBatches("c4", tok, 64, 2, split="eval"))), tok.eos_id)]
    assert evaluated == list(range(len(evaluated))) and len(evaluated) > 700, "validation is read once, in order"


def test_c4_hub_unreachable_is_a_data_error(offline, tok):
    with pytest.raises(
        DataError, match=r"allenai/c4 from the Hugging Face hub, which is not reachable.*--dataset PATH"
    ):
        PackedBatches("c4", tok, 64, 2)


def _jsonl(root: Path, texts: list[str]) -> Path:
    return _write_jsonl(root / "data.jsonl", texts)


def _json(root: Path, texts: list[str]) -> Path:
    path = root / "data.json"
    path.write_text(json.dumps([{"text": t, "meta": {"n": i}} for i, t in enumerate(texts)]))
    return path


def _jsonl_gz(root: Path, texts: list[str]) -> Path:
    path = root / "c4-train.00000-of-00001.json.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": t, "url": "u", "timestamp": "t"}) + "\n" for t in texts)
    return path


def _parquet(root: Path, texts: list[str]) -> Path:
    path = root / "data.parquet"
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).to_parquet(str(path))
    return path


def _txt_dir(root: Path, texts: list[str]) -> Path:
    for i, text in enumerate(texts):
        (root / f"doc{i:03d}.txt").write_text(text + "\n\nwith a second paragraph.")
    return root


def _jsonl_dir(root: Path, texts: list[str]) -> Path:
    (root / "nested").mkdir()
    _write_jsonl(root / "a.jsonl", texts[:10])
    _write_jsonl(root / "nested" / "b.jsonl", texts[10:])
    (root / ".cache").mkdir()
    _write_jsonl(root / ".cache" / "ignored.jsonl", ["hidden files are not data"])
    (root / "README.md").write_text("not data")
    return root


def _saved(root: Path, texts: list[str]) -> Path:
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"))
    return root / "saved"


FORMATS = {"jsonl": _jsonl, "json": _json, "jsonl.gz": _jsonl_gz, "parquet": _parquet, "txt dir": _txt_dir}
FORMATS |= {"jsonl dir": _jsonl_dir, "saved dataset": _saved}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_trains_on_all_but_the_held_out_slice(fmt, tmp_path, tok, reference, small_texts):
    path = FORMATS[fmt](tmp_path, small_texts)
    texts = [t + "\n\nwith a second paragraph." for t in small_texts] if fmt == "txt dir" else small_texts
    index = _index(texts, reference)
    held = len(texts) // 10
    train = PackedBatches(str(path), tok, 16, 2)
    assert sorted(index[d] for d in _epoch_token_docs(train)) == list(range(held, len(texts)))
    evaluated = _segments(_stream(list(PackedBatches(str(path), tok, 4, 2, split="eval"))), tok.eos_id)
    assert [index[d] for d in evaluated] == list(range(held))[: len(evaluated)] and evaluated


def test_saved_dataset_dict_uses_its_own_validation_split(tmp_path, tok, reference, small_texts):
    splits = {"train": small_texts[:20], "validation": small_texts[20:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path)
    )
    index = _index(small_texts, reference)
    trained = [index[d] for d in _epoch_token_docs(PackedBatches(str(tmp_path), tok, 16, 2))]
    assert sorted(trained) == list(range(20)), "no slice held out: the validation split is the eval data"
    evaluated = _segments(_stream(list(PackedBatches(str(tmp_path), tok, 4, 2, split="eval"))), tok.eos_id)
    assert evaluated and [index[d] for d in evaluated] == list(range(20, 20 + len(evaluated)))


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_dataset_path_is_a_data_error(tmp_path, tok):
    with pytest.raises(DataError, match=r"--dataset .*nowhere: no such file or directory; give 'smoke', 'c4'"):
        PackedBatches(str(tmp_path / "nowhere"), tok, 16, 2)


def test_documents_without_a_text_field_are_a_data_error(tmp_path, tok):
    path = tmp_path / "content.jsonl"
    path.write_text(json.dumps({"content": "a document", "url": "u"}) + "\n")
    with pytest.raises(DataError, match=r"content\.jsonl: no 'text' field \(fields: content, url\); store each"):
        PackedBatches(str(path), tok, 16, 2)
    datasets.Dataset.from_dict({"content": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: no 'text' column \(columns: content\); rename"):
        PackedBatches(str(tmp_path / "saved"), tok, 16, 2)


def test_unusable_paths_are_data_errors(tmp_path, tok, small_texts):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type; give"):
        PackedBatches(str(tmp_path / "data.csv"), tok, 16, 2)
    with pytest.raises(DataError, match=r"holds no \.jsonl/\.json/\.parquet/\.txt files"):
        PackedBatches(str(tmp_path), tok, 16, 2)
    _write_jsonl(tmp_path / "a.jsonl", small_texts)
    (tmp_path / "b.txt").write_text("text")
    with pytest.raises(DataError, match=r"mixes file formats \(json, text\); keep one format"):
        PackedBatches(str(tmp_path), tok, 16, 2)


def test_too_little_data_is_a_data_error(tmp_path, tok, small_texts):
    path = _write_jsonl(tmp_path / "few.jsonl", small_texts[:5])
    with pytest.raises(DataError, match=r"too few documents to hold out an eval slice"):
        PackedBatches(str(path), tok, 16, 2, split="eval")
    one = _write_jsonl(tmp_path / "one.jsonl", small_texts[:1])
    with pytest.raises(DataError, match=r"rank 1 of 2 gets no documents to train on; use fewer ranks"):
        next(iter(PackedBatches(str(one), tok, 16, 2, rank=1, world_size=2)))


def test_bad_shapes_and_ranks_are_data_errors(tok):
    with pytest.raises(DataError, match="seq_len 0"):
        PackedBatches("smoke", tok, 0, 2)
    with pytest.raises(DataError, match="rank 2 is outside world_size 2"):
        PackedBatches("smoke", tok, 16, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="split 'test' is unknown"):
        PackedBatches("smoke", tok, 16, 2, split="test")


# --- whether the hub can be reached ---------------------------------------------------------------------------------


def test_hub_probe_names_an_endpoint_that_does_not_answer():
    from vscale_plugin.data import hub
    from vscale_plugin.testing.distributed import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reason = hub._probe(endpoint)
    assert reason is not None and reason.startswith(f"{endpoint} does not answer")


def test_hub_probe_accepts_an_endpoint_that_answers():
    import http.server
    import threading

    from vscale_plugin.data import hub

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub._probe(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()


def test_hub_offline_mode_is_unreachable_without_a_probe(monkeypatch):
    import huggingface_hub

    from vscale_plugin.data import hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    monkeypatch.setattr(hub, "_probe", lambda endpoint: pytest.fail("probed the hub in offline mode"))
    assert hub.hub_unreachable() == "HF_HUB_OFFLINE is set"
