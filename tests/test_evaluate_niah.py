"""Needle in a haystack and YaRN (vscale_plugin.evaluate.niah, .yarn): prompts, greedy decoding, scoring, RoPE."""

from __future__ import annotations

import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vscale_plugin
from vscale_plugin.data import TOKENIZER_CACHE, Tokenizer, build_tokenizer, smoke_documents
from vscale_plugin.evaluate.niah import (
    TASKS,
    Sample,
    check_task,
    evaluate_niah,
    greedy_generate,
    greedy_generate_batch,
    make_samples,
    max_new_tokens,
    score,
)
from vscale_plugin.evaluate.yarn import max_context, yarn
from vscale_plugin.testing.models import tiny_model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer(None, "smoke", TOKENIZER_CACHE)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return smoke_documents()


def _needles(prompt: str) -> dict[str, str]:
    """key -> value of every needle in a decoded prompt."""
    return dict(re.findall(r"One of the special magic \w+ for (\S+) is: (\S+?)\.(?:\s|$)", prompt))


def _asked_key(prompt: str) -> str:
    return re.findall(r"What is the special magic \w+ for (\S+) mentioned", prompt)[-1]


# --- prompts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_make_samples_is_deterministic_in_the_seed(task, tokenizer, documents):
    first = make_samples(task, tokenizer, documents, 512, 4, seed=0)
    assert make_samples(task, tokenizer, documents, 512, 4, seed=0) == first
    other = make_samples(task, tokenizer, documents, 512, 4, seed=1)
    assert [s.answer for s in other] != [s.answer for s in first]
    keys = [_asked_key(tokenizer.decode(s.input_ids)) for s in (*first, *other)]
    assert len(set(keys)) > 4


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context", [256, 333, 1024, 2048])
def test_prompt_fills_the_context_up_to_the_answer(task, context, tokenizer, documents):
    for sample in make_samples(task, tokenizer, documents, context, 3, seed=7):
        assert len(sample.input_ids) + max_new_tokens(task, tokenizer) == context
        assert all(isinstance(t, int) for t in sample.input_ids)


@pytest.mark.parametrize("task", TASKS)
def test_asked_value_occurs_in_the_prompt_exactly_once(task, tokenizer, documents):
    for sample in make_samples(task, tokenizer, documents, 1024, 5, seed=3):
        prompt = tokenizer.decode(sample.input_ids)
        assert prompt.count(sample.answer) == 1
        assert prompt.startswith("Some special magic")
        assert prompt.endswith("mentioned in the provided text is")
        assert _needles(prompt)[_asked_key(prompt)] == sample.answer
        noun = "uuid" if task == "niah_single_3" else "number"
        assert f"special magic {noun} for" in prompt


def test_values_are_seven_digit_numbers_or_uuids(tokenizer, documents):
    for sample in make_samples("niah_single_2", tokenizer, documents, 512, 4, seed=0):
        assert re.fullmatch(r"[1-9]\d{6}", sample.answer)
    for sample in make_samples("niah_single_3", tokenizer, documents, 512, 4, seed=0):
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sample.answer)


def test_multikey_hides_four_distinct_keys_and_asks_one(tokenizer, documents):
    for sample in make_samples("niah_multikey_1", tokenizer, documents, 1024, 6, seed=5):
        prompt = tokenizer.decode(sample.input_ids)
        needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", prompt)
        assert len(needles) == 4
        assert len({k for k, _ in needles}) == 4 and len({v for _, v in needles}) == 4
        assert _asked_key(prompt) in dict(needles)
        assert dict(needles)[_asked_key(prompt)] == sample.answer


@pytest.mark.parametrize("task", TASKS)
def test_asked_depths_spread_evenly_over_the_context(task, tokenizer, documents):
    samples = make_samples(task, tokenizer, documents, 2048, 5, seed=0)
    depths = [s.depth for s in samples]
    assert all(0 <= d <= 1 for d in depths)
    assert depths == sorted(depths)
    for i, depth in enumerate(depths):
        assert depth == pytest.approx((i + 0.5) / 5, abs=0.06)


def test_needles_sit_at_sentence_boundaries_of_prose(tokenizer):
    essays = [" ".join(f"Essay {d} says thing {k} about the weather today." for k in range(40)) for d in range(30)]
    for sample in make_samples("niah_multikey_1", tokenizer, essays, 1024, 4, seed=2):
        prompt = tokenizer.decode(sample.input_ids)
        for match in re.finditer(r"One of the special magic numbers", prompt):
            before = prompt[: match.start()]
            # After a sentence, the prompt's introduction, or another needle at the same boundary.
            assert re.search(r"(today|afterwards|is: \d+)\. $", before), before[-80:]


def test_needles_sit_at_word_boundaries_of_any_text(tokenizer, documents):
    for task in TASKS:
        for sample in make_samples(task, tokenizer, documents, 2048, 4, seed=2):
            prompt = tokenizer.decode(sample.input_ids)
            for match in re.finditer(r"One of the special magic \w+ for \S+ is: \S+?\.", prompt):
                assert prompt[match.start() - 1] == " "
                assert prompt[match.end() : match.end() + 1] in (" ", ""), prompt[match.start() : match.end() + 20]


def test_short_haystack_repeats_its_documents(tokenizer):
    samples = make_samples("niah_single_2", tokenizer, ["A short essay. It has two sentences."], 600, 2, seed=0)
    prompt = tokenizer.decode(samples[0].input_ids)
    assert len(samples[0].input_ids) + max_new_tokens("niah_single_2", tokenizer) == 600
    assert prompt.count("It has two sentences.") > 10


def test_bad_arguments_raise_clear_errors(tokenizer, documents):
    with pytest.raises(ValueError, match="niah_single_2, niah_single_3, niah_multikey_1"):
        check_task("niah_single_1")
    assert check_task("niah_single_3") == "niah_single_3"
    with pytest.raises(ValueError, match="too small"):
        make_samples("niah_multikey_1", tokenizer, documents, 100, 1, seed=0)
    with pytest.raises(ValueError, match="no text"):
        make_samples("niah_single_2", tokenizer, ["", "  \n"], 512, 1, seed=0)
    with pytest.raises(ValueError, match="none"):
        make_samples("niah_single_2", tokenizer, [], 512, 1, seed=0)
    synthetic = Tokenizer("synthetic", 64, 0, lambda texts: [[1] for _ in texts])
    with pytest.raises(ValueError, match="has no text"):
        make_samples("niah_single_2", synthetic, documents, 512, 1, seed=0)


# --- greedy decoding -------------------------------------------------------------------------------------------


def _argmax_without_cache(model: nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generate_through_the_cache_equals_full_recomputation():
    model = tiny_model("llama", attn_implementation="eager", seed=1)
    prompt = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = _argmax_without_cache(model, prompt, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the KV cache under the installed transformers' own name
        assert greedy_generate(model, prompt, 16) == expected
    assert greedy_generate(model, torch.tensor([prompt]), 16) == expected
    assert greedy_generate(model, prompt, 0) == []


def test_greedy_generate_stops_at_eos():
    model = tiny_model("llama", attn_implementation="eager", seed=1)
    prompt = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = _argmax_without_cache(model, prompt, 16)
    eos = expected[5]
    assert greedy_generate(model, prompt, 16, eos_id=eos) == expected[: expected.index(eos)]


def test_a_batch_of_prompts_generates_what_each_prompt_does_alone():
    model = tiny_model("llama", attn_implementation="eager", seed=1)
    prompts = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(2))
    alone = [_argmax_without_cache(model, row.tolist(), 12) for row in prompts]
    eos = alone[1][4]  # row 1 stops early; the others go on
    expected = [row[: row.index(eos)] if eos in row else row for row in alone]
    assert greedy_generate_batch(model, prompts, 12, eos_id=eos) == expected


# --- scoring ---------------------------------------------------------------------------------------------------


class CopyModel(nn.Module):
    """A perfect reader: finds the asked key's needle in the prompt and emits its value's tokens, then EOS. Its
    "past_key_values" is the sequence so far and the answer it is spelling out."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, past_key_values: list | None = None, use_cache: bool = True):
        if past_key_values is None:
            past_key_values = []
            for row in input_ids.tolist():
                prompt = self.tokenizer.decode(row)
                answer = [*self.tokenizer.encode(" " + _needles(prompt)[_asked_key(prompt)]), self.tokenizer.eos_id]
                past_key_values.append({"sequence": [], "answer": answer, "emitted": 0})
        logits = torch.zeros(*input_ids.shape, self.tokenizer.vocab_size)
        for row, state in enumerate(past_key_values):
            state["sequence"] += input_ids[row].tolist()
            answer, emitted = state["answer"], state["emitted"]
            logits[row, -1, answer[min(emitted, len(answer) - 1)]] = 1.0
            state["emitted"] += 1
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


class GarbageModel(nn.Module):
    """Always says the same token: no answer ever."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.vocab_size = tokenizer.vocab_size
        self.token = tokenizer.encode(" the")[-1]

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[:, -1, self.token] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


@pytest.fixture(scope="module")
def all_tasks(tokenizer, documents) -> list[Sample]:
    return [s for task in TASKS for s in make_samples(task, tokenizer, documents, 384, 3, seed=0)]


def test_a_model_that_reads_the_needle_scores_one(tokenizer, all_tasks):
    for task in TASKS:
        assert evaluate_niah(CopyModel(tokenizer), tokenizer, [s for s in all_tasks if s.task == task]) == 1.0


def test_a_model_that_does_not_scores_zero(tokenizer, all_tasks):
    assert evaluate_niah(GarbageModel(tokenizer), tokenizer, all_tasks) == 0.0
    random_llama = tiny_model("llama", vocab_size=tokenizer.vocab_size, max_position_embeddings=512, seed=0)
    assert evaluate_niah(random_llama, tokenizer, all_tasks[::3]) == 0.0


def test_score_is_a_case_insensitive_substring_match():
    assert score(" 1234567.", "1234567")
    assert score("The answer is 1234567 indeed", "1234567")
    assert score("3F2A9C1E-4B7D", "3f2a9c1e-4b7d")
    assert score("3f2a9c1e-4b7d", "3F2A9C1E-4B7D")
    assert not score("123456", "1234567")
    assert not score("1234 567", "1234567")
    assert not score("", "1234567")
    with pytest.raises(ValueError, match="empty"):
        score("anything", "")


# --- YaRN ------------------------------------------------------------------------------------------------------


def yarn_reference(dim: int, base: float, factor: float, native: int) -> tuple[torch.Tensor, float]:
    """YaRN's frequencies (Peng et al. 2023, "NTK-by-parts" with their code's dimension ramp) and attention factor,
    in float64: dimensions that turn more than beta_fast = 32 times over the native context keep their frequency,
    those that turn less than beta_slow = 1 times are interpolated by 1 / factor, a linear ramp in between."""
    beta_fast, beta_slow = 32.0, 1.0
    j = torch.arange(dim // 2, dtype=torch.float64)
    theta = base ** (-2 * j / dim)  # RoPE: theta_j = b^(-2j/|D|)

    def dimension(rotations: float) -> float:  # the j whose wavelength 2 pi / theta_j fits `rotations` in native
        return dim * math.log(native / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension(beta_fast)), 0)
    high = min(math.ceil(dimension(beta_slow)), dim - 1)
    interpolate = ((j - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = theta * (1 - interpolate) + theta / factor * interpolate  # h(theta) = (1 - g) theta / s + g theta
    return inv_freq, 0.1 * math.log(factor) + 1  # sqrt(1/t) = 0.1 ln s + 1


@pytest.mark.parametrize(("factor", "native", "head_dim"), [(2.0, 256, 8), (4.0, 512, 16), (3.0, 256, 32)])
def test_yarn_rotary_matches_the_reference_formula(factor, native, head_dim):
    model = tiny_model("llama", head_dim=head_dim)
    base = 10000.0
    with yarn(model, factor, native):
        rotary = model.model.rotary_emb
        inv_freq, attention = yarn_reference(head_dim, base, factor, native)
        torch.testing.assert_close(rotary.inv_freq.double(), inv_freq, rtol=1e-6, atol=0)
        assert rotary.attention_scaling == pytest.approx(attention, rel=1e-12)
        # The paper's limits: fast dimensions (> 32 turns over native) unchanged, slow ones (< 1 turn) divided by F.
        theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        turns = native * theta / (2 * math.pi)
        fast, slow = turns > 32, turns < 1
        assert fast.any() and slow.any()
        torch.testing.assert_close(rotary.inv_freq.double()[fast], theta[fast], rtol=1e-6, atol=0)
        torch.testing.assert_close(rotary.inv_freq.double()[slow], theta[slow] / factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("vscaled", [False, True], ids=["plain", "vscale"])
def test_yarn_runs_beyond_native_and_restores_the_model_bitwise(vscaled):
    model = tiny_model("llama", seed=2)
    if vscaled:
        vscale_plugin.apply_vscale(model)
    native = max_context(model)
    assert native == 256
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    config = model.config.to_dict()
    rotary = model.model.rotary_emb
    with torch.no_grad():
        before = model(ids).logits
        with yarn(model, 2.0, native) as extended:
            assert extended is model
            assert max_context(model) == 512
            assert model.model.rotary_emb is not rotary
            assert model.model.rotary_emb.inv_freq.device == rotary.inv_freq.device
            long = model(torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(1))).logits
            assert long.shape[1] == 512 and long.isfinite().all()
            assert not torch.equal(model(ids).logits, before)
        after = model(ids).logits
    assert model.model.rotary_emb is rotary
    assert model.config.to_dict() == config
    assert torch.equal(after, before)


def test_yarn_restores_the_model_when_the_block_raises():
    model = tiny_model("llama")
    config = model.config.to_dict()
    rotary = model.model.rotary_emb
    with pytest.raises(RuntimeError, match="inside"), yarn(model, 2.0, 256):
        raise RuntimeError("inside")
    assert model.model.rotary_emb is rotary
    assert model.config.to_dict() == config


def test_yarn_rejects_factors_at_most_one():
    model = tiny_model("llama")
    for factor in (1.0, 0.5):
        with pytest.raises(ValueError, match="greater than 1"), yarn(model, factor, 256):
            pass
