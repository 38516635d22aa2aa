"""lm-evaluation-harness in-process (issue 13, item 5): the real harness on our in-memory V-scaled model with our
offline task, its log-likelihoods and accuracy against an independent computation with plain forward passes."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import vscale_plugin as vsp
from vscale_plugin.data import TOKENIZER_CACHE, DataError, build_tokenizer
from vscale_plugin.evaluate import harness
from vscale_plugin.testing.models import tiny_model

pytestmark = pytest.mark.slow  # the real harness: about a minute in all

pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is an optional extra: {harness.INSTALL}")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ours():
    return build_tokenizer(None, "smoke", TOKENIZER_CACHE)


@pytest.fixture(scope="module")
def model(ours):
    model = vsp.apply_vscale(tiny_model("llama", vocab_size=ours.vocab_size, seed=3)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vscale" in name:
                p.copy_(torch.linspace(-1, 1, p.numel()))
    return model


def _loglikelihood(model, ours, context: str, continuation: str) -> float:
    """log p(continuation | context), as lm-eval splits them: the continuation's tokens are those the whole text has
    beyond the context's."""
    whole, prefix = ours.encode(context + continuation), ours.encode(context)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logits[t - 1, whole[t]].item() for t in range(len(prefix), len(whole)))


def test_harness_scores_our_model_object_as_an_independent_computation_does(model, ours):
    tokenizer = harness.hf_tokenizer(None, "smoke")
    out = harness.harness_results(model, tokenizer, [harness.LOCAL_TASK], log_samples=True, batch_size=4)
    samples = out["samples"][harness.LOCAL_TASK]
    assert len(samples) == 32
    unscaled = vsp.remove_vscale(copy.deepcopy(model))
    correct, differs = 0, 0
    for sample in samples:
        mine = [_loglikelihood(model, ours, ctx, cont) for ctx, cont in sample["arguments"]]
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(mine, abs=1e-3), sample["doc"]
        correct += max(range(len(mine)), key=mine.__getitem__) == sample["doc"]["answer"]
        ctx, cont = sample["arguments"][0]
        differs += abs(_loglikelihood(unscaled, ours, ctx, cont) - theirs[0]) > 1e-3
    assert differs == len(samples), "lm-eval ran the V-scaled object, not a model without V-scale"
    scores = harness.run_lm_eval(model, tokenizer, [harness.LOCAL_TASK], batch_size=4)
    assert scores == {harness.LOCAL_TASK: {"acc": pytest.approx(correct / len(samples))}}


def test_hf_tokenizer_has_our_ids_and_refuses_a_vocabulary_without_text(ours):
    tokenizer = harness.hf_tokenizer(None, "smoke")
    text = "The needle is 4711203, hidden in Ünïcödé text."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tokenizer.eos_token_id == ours.eos_id and len(tokenizer) == ours.vocab_size
    with pytest.raises(DataError, match="no text"):
        harness.hf_tokenizer(None, "bigram_backcopy")


def test_unknown_task_and_missing_harness_are_one_line_errors(model, monkeypatch):
    tokenizer = harness.hf_tokenizer(None, "smoke")
    with pytest.raises(ValueError, match=r"--lm_eval_tasks no_such_task: not an lm-eval task here"):
        harness.run_lm_eval(model, tokenizer, ["no_such_task"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(harness.HarnessMissing, match=r'pip install "vscale-plugin\[eval\]"'):
        harness.run_lm_eval(model, tokenizer, [harness.LOCAL_TASK])
