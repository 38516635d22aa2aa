"""The evaluation's own parts (issue 13): perplexity and bits per byte against an independent float64 computation,
the grid of work items and its errors, how items spread over ranks, the summary over seeds and the report's tables."""

from __future__ import annotations

import math

import pytest
import torch

from vscale_plugin.data import TOKENIZER_CACHE, build_tokenizer
from vscale_plugin.evaluate import report, runner
from vscale_plugin.evaluate.models import ModelSource
from vscale_plugin.evaluate.perplexity import perplexity
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.testing.models import tiny_model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None, "smoke", TOKENIZER_CACHE)


def _reference_nll(model, windows) -> tuple[float, int]:
    """Summed NLL of every token but each window's first, one position at a time in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows:
            logits = model(input_ids=batch).logits.double()
            for row in range(batch.shape[0]):
                for t in range(1, batch.shape[1]):
                    log_probs = logits[row, t - 1] - torch.logsumexp(logits[row, t - 1], dim=0)
                    total -= log_probs[batch[row, t]].item()
                    count += 1
    return total, count


def test_perplexity_and_bits_per_byte_match_an_independent_computation(tok):
    model = tiny_model("llama", vocab_size=tok.vocab_size).eval()
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(2, tok.vocab_size, (3, 24), generator=gen) for _ in range(3)]
    nll, count = _reference_nll(model, windows)
    result = perplexity(model, windows, tok)
    assert result.tokens == count == 3 * 3 * 23
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    n_bytes = sum(len(tok.decode(row[1:].tolist()).encode("utf-8")) for batch in windows for row in batch)
    assert result.bytes == n_bytes
    assert result.bpb == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    # max_windows counts rows, across batches
    part = perplexity(model, windows, tok, max_windows=4)
    assert part.tokens == 4 * 23
    assert part.nll == pytest.approx(_reference_nll(model, [windows[0], windows[1][:1]])[0], rel=1e-5)


def test_perplexity_without_text_has_no_bits_per_byte_and_no_window_is_an_error():
    synthetic = build_tokenizer(None, "bigram_backcopy", TOKENIZER_CACHE)
    model = tiny_model("llama", vocab_size=synthetic.vocab_size).eval()
    result = perplexity(model, [torch.randint(0, synthetic.vocab_size, (2, 16))], synthetic)
    assert result.bpb is None and result.ppl > 1
    with pytest.raises(ValueError, match="no held-out window"):
        perplexity(model, [], synthetic)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("ppl", "niah_single_9")}, r"--tasks niah_single_9: unknown task; choose from ppl, niah_single_2"),
        ({"quants": ("w3a3",)}, r"--quant w3a3: .*w8a8_static"),
        ({"seeds": 0}, r"--seeds 0: must be >= 1"),
        ({"calib": 0}, r"--calib 0: w8a8_static.* calibrate on training sequences; pass --calib"),
        ({"yarn": 1.0}, r"--yarn 1: the YaRN factor must be > 1"),
    ],
)
def test_grid_refuses_bad_settings_naming_the_fix(kwargs, message):
    with pytest.raises(UsageError, match=message):
        runner.Grid(**kwargs)


def _target(native: int = 64) -> runner.Target:
    source = ModelSource(path="some/dir", label="m", tokenizer=None, dataset="smoke")
    model = tiny_model("llama", max_position_embeddings=native)
    return runner.Target(source, model, tokenizer=None, dataset="smoke", native=native)  # type: ignore[arg-type]


def test_contexts_beyond_the_native_positions_need_yarn():
    target = _target(64)
    assert runner.contexts_of(target, runner.Grid()) == [64]
    with pytest.raises(UsageError, match=r"--context 256: more than the 64 positions .* pass --yarn 4 to extend"):
        runner.contexts_of(target, runner.Grid(contexts=(64, 256)))
    assert runner.contexts_of(target, runner.Grid(contexts=(64, 256), yarn=4)) == [64, 256]
    with pytest.raises(UsageError, match=r"x YaRN factor 2; raise --yarn to 4 or more"):
        runner.contexts_of(target, runner.Grid(contexts=(256,), yarn=2))


def test_work_items_cover_the_grid_once_and_ranks_share_them():
    targets = [_target(), _target()]
    grid = runner.Grid(tasks=("ppl", "niah_single_2"), quants=("none", "w8a8_static"), contexts=(32, 64), seeds=3)
    items = runner.work_items(targets, grid)
    # per model: 2 schemes x 2 contexts x (1 perplexity + 3 seeds of one NIAH task)
    assert len(items) == len(set(items)) == 2 * 2 * 2 * 4
    assert {i.seed for i in items if i.task == "ppl"} == {None}
    shares = [items[rank::3] for rank in range(3)]
    assert sorted(i for share in shares for i in share) == sorted(items)


def _records():
    rows = []
    for model, vscale, acc in (("base", "off", [0.2, 0.4, 0.3]), ("vs", "learned", [0.6, 0.8, 0.7])):
        for scheme in ("none", "w8a8_static"):
            drop = 0.0 if scheme == "none" else 0.1
            rows += [{"model": model, "vscale": vscale, "quant": scheme, "task": "niah_single_2", "context": 64,
                      "seed": s, "metric": "accuracy", "value": a - drop} for s, a in enumerate(acc)]  # fmt: skip
            rows.append({"model": model, "vscale": vscale, "quant": scheme, "task": "ppl", "context": 64,
                         "seed": None, "metric": "ppl", "value": 20.0 + drop * 10 + (vscale == "off")})  # fmt: skip
    return rows


def test_mlflow_metrics_are_means_over_seeds_with_their_std():
    metrics = report.mlflow_metrics(_records(), "vs")
    assert metrics["eval/niah_single_2/none/64"] == pytest.approx(0.7)
    assert metrics["eval/niah_single_2/none/64/std"] == pytest.approx(0.1)  # sample std of 0.6, 0.8, 0.7
    assert metrics["eval/niah_single_2/w8a8_static/64"] == pytest.approx(0.6)
    assert metrics["eval/ppl/w8a8_static/64"] == pytest.approx(21.0)
    assert "eval/ppl/none/64/std" not in metrics, "one value: no std"
    assert report.metric_name("arc_easy", "acc") == "arc_easy"
    assert report.metric_name("arc_easy", "acc_norm") == "arc_easy.acc_norm"


def test_tables_put_the_baseline_first_with_the_difference():
    text = report.tables(_records())
    niah = text[text.index("### niah_single_2") :]
    assert "| quant | 64: off | 64: learned | Δ |" in niah
    assert "| none | 30.0 ± 10.0 | 70.0 ± 10.0 | +40.0 |" in niah
    assert "| w8a8_static | 20.0 ± 10.0 | 60.0 ± 10.0 | +40.0 |" in niah
    ppl = text[text.index("### ppl") : text.index("### niah_single_2")]
    assert "| none | 21 | 20 | -1 |" in ppl


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_naming_the_fix(tmp_path):
    # The smoke dataset's tokenizer (4096 ids) on a model of 128 embeddings: ids past 127 would index nothing.
    tiny_model("llama").save_pretrained(tmp_path / "small-vocab")
    source = ModelSource(path=str(tmp_path / "small-vocab"), label="m", tokenizer=None, dataset="smoke")
    with pytest.raises(
        UsageError, match=r"has 4096 tokens but --model .*small-vocab has 128 embeddings; pass the --tok"
    ):
        runner.Target.load(source)


def test_a_tensor_parallel_training_checkpoint_is_refused_naming_its_export(tmp_path):
    # DeepSpeed's zero_to_fp32 reads one model-parallel rank and failed with "Expected 1 of '*_optim_states.pt'".
    import json

    from vscale_plugin.evaluate import models

    tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "latest").write_text("step4")
    (tmp_path / models.RUN_RECORD).write_text(json.dumps({"settings": {"tensor_parallel": 2}}))
    assert models.is_training_checkpoint(tmp_path)
    with pytest.raises(UsageError, match=r"autotp_size 2, which DeepSpeed's consolidation does not join; give .*hf"):
        models.load_training_checkpoint(tmp_path, torch.float32)
