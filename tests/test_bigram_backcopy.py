"""The Bigram-Backcopy task (vscale_plugin.data.bigram_backcopy): the rules of Guo et al. 2024 checked on the
generated sequences, determinism, the data-parallel split, resume, and the errors a user meets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vscale_plugin.data import DataError, build_tokenizer, check_dataset, open_batches
from vscale_plugin.data.bigram_backcopy import BOS_ID, BigramBackcopy, BigramBackcopyBatches

SPEC = "bigram_backcopy:vocab=32,triggers=3,sparsity=0.1"


def _rows(spec: str = SPEC, n: int = 64, seq_len: int = 48, seed: int = 0) -> np.ndarray:
    data = BigramBackcopyBatches(spec, seq_len, n, seed=seed)
    return next(iter(data)).numpy()


def test_every_row_starts_with_bos_and_the_rest_are_ordinary_tokens():
    rows = _rows()
    task = BigramBackcopy.parse(SPEC)
    assert (rows[:, 0] == BOS_ID).all()
    assert rows[:, 1:].min() >= 1 and rows[:, 1:].max() <= task.vocab
    assert task.vocab_size == 33


def test_after_a_trigger_the_token_before_it_comes_back():
    task = BigramBackcopy.parse(SPEC)
    rows = _rows(n=256)
    triggers = set(task.trigger_ids.tolist())
    copies = 0
    for row in rows:
        for t in range(2, len(row) - 1):
            if row[t] in triggers:
                assert row[t + 1] == row[t - 1], (row[t - 2 : t + 2], t)
                copies += 1
    assert copies > 100  # the rule was exercised, not vacuous
    # copy_positions marks exactly those positions
    mask = task.copy_positions(rows)
    assert mask.sum() == copies + np.isin(rows[:, -1], task.trigger_ids).sum()


def test_other_transitions_follow_the_bigram_rows():
    """Counted transitions out of non-trigger tokens match the transition matrix (chi-square-free: total variation
    per frequent row below what 4000+ draws allow)."""
    task = BigramBackcopy.parse(SPEC)
    rows = _rows(n=2048, seq_len=64)
    counts = np.zeros((task.vocab, task.vocab))
    triggers = set(task.trigger_ids.tolist())
    for row in rows:
        for t in range(1, len(row) - 1):
            if row[t] not in triggers:
                counts[row[t] - 1, row[t + 1] - 1] += 1
    frequent = counts.sum(1) > 2000
    assert frequent.sum() >= 5
    empirical = counts[frequent] / counts[frequent].sum(1, keepdims=True)
    tv = 0.5 * np.abs(empirical - task.transition[frequent]).sum(1)
    assert tv.max() < 0.06, tv


def test_rows_are_sparse_and_the_triggers_are_the_most_frequent_tokens():
    task = BigramBackcopy.parse(SPEC)
    p = task.transition
    np.testing.assert_allclose(p.sum(1), 1.0)
    # Dirichlet(0.1) over 32 tokens: a few tokens carry most of each row
    top4 = np.sort(p, axis=1)[:, -4:].sum(1)
    assert np.median(top4) > 0.8
    # the stationary distribution is stationary, and the triggers are its largest entries
    np.testing.assert_allclose(task.stationary @ p, task.stationary, atol=1e-9)
    largest = np.argsort(task.stationary)[-3:] + 1
    assert set(task.trigger_ids.tolist()) == set(largest.tolist())
    # denser rows with a larger concentration
    dense = BigramBackcopy(vocab=32, sparsity=10.0).transition
    assert np.median(np.sort(dense, axis=1)[:, -4:].sum(1)) < 0.4


def test_the_same_seed_gives_the_same_stream_and_another_seed_another():
    np.testing.assert_array_equal(_rows(seed=3), _rows(seed=3))
    assert (_rows(seed=3) != _rows(seed=4)).mean() > 0.5
    # task_seed changes the task, not only the draws
    a, b = BigramBackcopy(task_seed=0), BigramBackcopy(task_seed=1)
    assert not np.allclose(a.transition, b.transition)


def test_ranks_split_one_global_batch_the_same_way_whatever_their_number():
    """The sequences of an optimiser step of 8 are those of one rank with micro-batch 8, or 2 ranks x 2
    micro-batches of 2, or 4 ranks x 1 micro-batch of 2 (in another order)."""

    def step_rows(world: int, micro: int, accumulation: int, step: int) -> set[tuple[int, ...]]:
        rows = set()
        for rank in range(world):
            data = BigramBackcopyBatches(SPEC, 24, micro, rank=rank, world_size=world, seed=5)
            it = iter(data)
            batches = [next(it) for _ in range((step + 1) * accumulation)][step * accumulation :]
            rows |= {tuple(r.tolist()) for b in batches for r in b}
        return rows

    reference = step_rows(1, 8, 1, step=2)
    assert len(reference) == 8
    assert step_rows(2, 2, 2, step=2) == reference
    assert step_rows(4, 2, 1, step=2) == reference
    # ranks get disjoint rows
    r0 = next(iter(BigramBackcopyBatches(SPEC, 24, 4, rank=0, world_size=2)))
    r1 = next(iter(BigramBackcopyBatches(SPEC, 24, 4, rank=1, world_size=2)))
    assert not {tuple(r.tolist()) for r in r0} & {tuple(r.tolist()) for r in r1}


def test_resume_continues_with_the_batches_an_uninterrupted_stream_gives():
    full = BigramBackcopyBatches(SPEC, 16, 4, seed=1)
    it = iter(full)
    expected = [next(it) for _ in range(7)]
    first = BigramBackcopyBatches(SPEC, 16, 4, seed=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    second = BigramBackcopyBatches(SPEC, 16, 4, seed=1)
    second.load_state_dict(state)
    resumed = [b for _, b in zip(range(4), second, strict=False)]
    for a, b in zip(expected[3:], resumed, strict=True):
        torch.testing.assert_close(a, b)
    other = BigramBackcopyBatches(SPEC, 16, 4, seed=2)
    with pytest.raises(DataError, match="another stream: seed=1 \\(now 2\\)"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        second.load_state_dict({**state, "position": {"batch": -1}})


def test_eval_is_held_out_the_same_every_pass_and_checked_for_size():
    eval_data = BigramBackcopyBatches(SPEC, 32, 8, rank=1, world_size=2, split="eval", eval_docs=64)
    passes = [list(eval_data), list(eval_data)]
    assert len(passes[0]) == 4  # 64 sequences in rounds of 2 ranks x 8
    for a, b in zip(*passes, strict=True):
        torch.testing.assert_close(a, b)
    train = {tuple(r.tolist()) for _, b in zip(range(8), BigramBackcopyBatches(SPEC, 32, 8), strict=False) for r in b}
    held = {tuple(r.tolist()) for b in passes[0] for r in b}
    assert not train & held
    eval_data.check()
    with pytest.raises(DataError, match="fewer than one batch per rank"):
        BigramBackcopyBatches(SPEC, 32, 64, world_size=2, split="eval", eval_docs=64).check()


def test_the_launchers_data_door_and_tokenizer_take_the_task(tmp_path):
    tokenizer = build_tokenizer(None, SPEC, tmp_path)
    assert tokenizer.vocab_size == 33 and tokenizer.name == BigramBackcopy.parse(SPEC).spec
    batches = open_batches(SPEC, tokenizer, 16, 2)
    assert isinstance(batches, BigramBackcopyBatches)
    assert next(iter(batches)).shape == (2, 16)
    with pytest.raises(DataError, match=r"own vocabulary.*drop --tokenizer"):
        build_tokenizer("gpt2", SPEC, tmp_path)
    with pytest.raises(DataError, match="encodes no text"):
        tokenizer.encode("hello")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bigram_backcopy:vocab=1", "at least 2 tokens"),
        ("bigram_backcopy:triggers=0", "triggers=0 must be between 1 and vocab-1"),
        ("bigram_backcopy:sparsity=0", "must be positive"),
        ("bigram_backcopy:vocab=ten", "vocab='ten' is not a number"),
        ("bigram_backcopy:size=3", "'size=3' is not an option.*vocab, triggers, sparsity, task_seed"),
        ("bigram_backcopy:vocab", "'vocab' is not an option"),
    ],
)
def test_a_malformed_task_is_one_clear_error(spec, message):
    with pytest.raises(DataError, match=message):
        check_dataset(spec)


def test_a_dataset_that_names_nothing_is_refused_with_the_choices():
    with pytest.raises(DataError, match=r"no such file or directory.*smoke / c4 / bigram_backcopy"):
        check_dataset("/no/such/corpus.jsonl")
