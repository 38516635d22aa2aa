"""launchers/analyze.py: post-hoc statistics of a saved model equal measure() on the same sequences."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import vscale_plugin as vsp
from vscale_plugin.data import PackedBatches, build_tokenizer, padded_batches
from vscale_plugin.testing.models import tiny_model

REPO = Path(__file__).resolve().parents[1]
ANALYZE = REPO / "launchers" / "analyze.py"
# Whole-tensor statistics of one forward call (SPEC 4, qr/): over several batches, their mean over the batches.
PER_CALL = ("qr/max_over_median/", "qr/int8_error/")


def _per_call_mean(model, batches) -> dict[str, float]:
    """The per-call qr/ metrics of ``batches`` run one forward call each, averaged over the calls."""
    alone = [vsp.measure(model, ids) for ids in batches]
    return {k: sum(m[k] for m in alone) / len(alone) for k in alone[0] if k.startswith(PER_CALL) and "/max" not in k}


def _assert_matches(metrics, expected, per_call):
    """``metrics`` equal ``expected`` (one call), their per-call qr/ keys ``per_call`` (several)."""
    assert set(metrics) == set(expected)
    for key, value in {**{k: v for k, v in expected.items() if not k.startswith(PER_CALL)}, **per_call}.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A V-scaled tiny Llama with its own word-level tokenizer, and a jsonl corpus in its vocabulary."""
    root = tmp_path_factory.mktemp("analyze")
    model_dir = root / "model"
    vocab = {**{f"w{i}": i for i in range(126)}, "[UNK]": 126, "</s>": 127}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>").save_pretrained(model_dir)
    model = vsp.apply_vscale(tiny_model("llama"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vscale" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()))
    model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(300):
        words = torch.randint(0, 126, (int(torch.randint(10, 60, (1,), generator=g)),), generator=g)
        lines.append(json.dumps({"text": " ".join(f"w{i}" for i in words.tolist())}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _analyze(saved, *flags):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{saved / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "VSP_CACHE": str(saved / "cache")}  # fmt: skip
    return subprocess.run([sys.executable, str(ANALYZE), *map(str, flags)], cwd=saved, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_analyze_matches_measure_on_the_same_sequences_and_logs_to_mlflow(saved):
    out = saved / "out"
    proc = _analyze(saved, "--model", saved / "model", "--dataset", saved / "corpus.jsonl", "--batches", 2,
                    "--batch_size", 2, "--seq_len", 48, "--out", out, "--run_name", "post-hoc")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "R_GS" in proc.stdout and "L01" in proc.stdout and "median R_GS" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())

    tokenizer = build_tokenizer(str(saved / "model"), str(saved / "corpus.jsonl"), saved / "cache")
    data = iter(PackedBatches(str(saved / "corpus.jsonl"), tokenizer, 48, 2, split="eval"))
    batches = [next(data), next(data)]
    model = vsp.from_pretrained(saved / "model", attn_implementation="sdpa")
    expected = vsp.measure(model, torch.cat(batches))
    _assert_matches(metrics, expected, _per_call_mean(model, batches))
    assert "kurt h_out" in proc.stdout and "max h_out kurtosis" in proc.stdout

    client = MlflowClient(f"sqlite:///{saved / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vscale-plugin-analysis").experiment_id])
    assert run.data.tags["analysis"] == "true" and run.data.tags["vscale"] == "learned"
    assert run.data.metrics["gs/ratio/median"] == pytest.approx(expected["gs/ratio/median"], rel=1e-4)
    assert {k for k in run.data.metrics if k.startswith("qr/")} == {k for k in expected if k.startswith("qr/")}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "stats")) == [
        "stats/metrics.json",
        "stats/profiles.json",
    ]


def test_analyze_on_padded_documents_equals_measure_and_does_not_depend_on_the_padding_side(saved):
    args = ("--model", saved / "model", "--dataset", saved / "corpus.jsonl", "--batch_size", 3, "--seq_len", 48)
    runs = {}
    for side in ("left", "right"):
        proc = _analyze(saved, *args, "--batches", 1, "--padding", side, "--out", saved / side, "--run_name", side)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[side] = json.loads((saved / side / "metrics.json").read_text())

    tokenizer = build_tokenizer(str(saved / "model"), str(saved / "corpus.jsonl"), saved / "cache")
    documents = PackedBatches(str(saved / "corpus.jsonl"), tokenizer, 48, 3, split="eval").documents()
    ids, mask = next(padded_batches(documents, 3, 48, "left", pad_id=tokenizer.eos_id))
    assert len(set(mask.sum(1).tolist())) > 1, "the documents must differ in length, or nothing is padded"
    model = vsp.from_pretrained(saved / "model", attn_implementation="sdpa")
    expected = vsp.measure(model, ids, attention_mask=mask)
    for side, metrics in runs.items():
        assert set(metrics) == set(expected), side
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (side, key)
    # Position 0 is each document's first token, not a window's: the padded run measures other sequences.
    packed = vsp.measure(model, next(iter(PackedBatches(str(saved / "corpus.jsonl"), tokenizer, 48, 3, split="eval"))))
    assert packed["ma/h_in/tok0/L00"] != pytest.approx(expected["ma/h_in/tok0/L00"], rel=1e-3)


def test_analyze_missing_model_is_a_one_line_error(saved):
    proc = _analyze(saved, "--model", saved / "nope", "--dataset", saved / "corpus.jsonl")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --model")
    assert "Traceback" not in proc.stderr


def _assert_error_line(proc, *names):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for name in names:
        assert name in line, (name, line)


def test_analyze_runs_as_a_module(saved):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{saved / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "VSP_CACHE": str(saved / "cache")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "vscale_plugin.apps.analyze", "--model", str(saved / "model"),
                           "--dataset", str(saved / "corpus.jsonl"), "--batches", "1", "--batch_size", "2",
                           "--seq_len", "48", "--out", str(saved / "as-module"), "--run_name", "as-module"],
                          cwd=saved, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median R_GS" in proc.stdout, "python -m ran nothing"
    assert (saved / "as-module" / "metrics.json").is_file()


def test_analyze_a_directory_that_is_no_model_names_model_not_tokenizer(saved, tmp_path):
    # A directory with the model's tokenizer but no config: before the fix the tokenizer loaded from it and the
    # error came later, from the model, as a traceback or as a tokenizer complaint.
    only_tokenizer = tmp_path / "only-tokenizer"
    only_tokenizer.mkdir()
    for f in (saved / "model").iterdir():
        if "token" in f.name:
            (only_tokenizer / f.name).write_bytes(f.read_bytes())
    proc = _analyze(saved, "--model", only_tokenizer, "--dataset", saved / "corpus.jsonl")
    _assert_error_line(proc, f"--model {only_tokenizer}", "not a Hugging Face model", "save_pretrained")


def test_analyze_with_a_tokenizer_larger_than_the_models_vocabulary_is_refused(saved, tmp_path):
    from vscale_plugin.testing.tokenizers import train_tokenizer

    texts = [json.loads(line)["text"] for line in (REPO / "tests/data/c4-sample.jsonl").open()][:60]
    large = train_tokenizer(texts, tmp_path / "bpe", vocab_size=384)  # on the model's 128 embeddings
    proc = _analyze(saved, "--model", saved / "model", "--dataset", saved / "corpus.jsonl",
                    "--tokenizer", tmp_path / "bpe", "--seq_len", 48)  # fmt: skip
    _assert_error_line(proc, f"{len(large)} tokens", f"--model {saved / 'model'} has 128 embeddings", "--tokenizer")


def test_analyze_with_a_seq_len_beyond_the_model_positions_is_refused(saved):
    proc = _analyze(saved, "--model", saved / "model", "--dataset", saved / "corpus.jsonl", "--seq_len", 300)
    _assert_error_line(proc, "--seq_len 300", "256 positions", "--seq_len 256 or less")


def test_analyze_an_architecture_without_statistics_is_refused_naming_it(saved, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(tmp_path / "gpt2")
    proc = _analyze(saved, "--model", tmp_path / "gpt2", "--dataset", saved / "corpus.jsonl", "--tokenizer",
                    saved / "model")  # fmt: skip
    _assert_error_line(proc, f"--model {tmp_path / 'gpt2'}", "gpt2", "llama")


@pytest.mark.distributed
def test_analyze_under_zero3_on_two_ranks_equals_one_process(saved):
    from vscale_plugin.testing.distributed import run_deepspeed

    args = ("--model", saved / "model", "--dataset", saved / "corpus.jsonl", "--seq_len", 48)
    single = _analyze(saved, *args, "--batches", 2, "--batch_size", 2, "--out", saved / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    # Each rank keeps every 2nd eval batch of 1 sequence: together the same 4 sequences as batches of 2 above.
    run_deepspeed(ANALYZE, *args, "--batches", 2, "--batch_size", 1, "--ds_config", REPO / "ds_configs" / "zero3.json",
                  "--out", saved / "zero3", env={"MLFLOW_TRACKING_URI": f"sqlite:///{saved / 'mlflow.db'}",
                  "HF_HUB_OFFLINE": "1", "VSP_CACHE": str(saved / "cache"), "OMP_NUM_THREADS": "1"})  # fmt: skip
    one = json.loads((saved / "one" / "metrics.json").read_text())
    zero3 = json.loads((saved / "zero3" / "metrics.json").read_text())
    # The per-call qr/ keys average 4 calls of 1 sequence there, 2 calls of 2 here: the 4 sequences one by one.
    tokenizer = build_tokenizer(str(saved / "model"), str(saved / "corpus.jsonl"), saved / "cache")
    data = iter(PackedBatches(str(saved / "corpus.jsonl"), tokenizer, 48, 2, split="eval"))
    sequences = torch.cat([next(data), next(data)])
    model = vsp.from_pretrained(saved / "model", attn_implementation="sdpa")
    _assert_matches(zero3, one, _per_call_mean(model, sequences.split(1)))


@pytest.mark.distributed
def test_analyze_under_ulysses_sequence_parallelism_on_two_ranks_equals_one_process(saved):
    # Long-context post-hoc analysis: both ranks read the same batches, each holds 24 of every sequence's 48
    # positions; every statistic, the per-call qr/ ones too (each call's shards together), equals one process's.
    from vscale_plugin.testing.distributed import run_deepspeed

    args = ("--model", saved / "model", "--dataset", saved / "corpus.jsonl", "--seq_len", 48, "--batches", 2,
            "--batch_size", 2)  # fmt: skip
    single = _analyze(saved, *args, "--out", saved / "one-sp")
    assert single.returncode == 0, single.stderr[-3000:]
    run_deepspeed(ANALYZE, *args, "--ds_config", REPO / "ds_configs" / "zero3_sp2.json", "--out", saved / "sp2",
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{saved / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                       "VSP_CACHE": str(saved / "cache"), "OMP_NUM_THREADS": "1"})  # fmt: skip
    one = json.loads((saved / "one-sp" / "metrics.json").read_text())
    sp = json.loads((saved / "sp2" / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{saved / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vscale-plugin-analysis").experiment_id
    (run,) = client.search_runs([experiment], filter_string="params.sequence_parallel_size = '2'")
    assert run.data.params["world_size"] == "2"  # it did run under Ulysses, 2 ranks per sequence
    assert len(one) > 100 and sorted(sp) == sorted(one)
    assert sp == pytest.approx(one, rel=1e-3, abs=1e-6)
