"""The evaluation grid (SPEC section 7): every (model, task, quantisation scheme, context, seed) cell is one work item;
items are spread over the ranks of a ``deepspeed``/``torchrun`` launch and their records gathered on every rank.

    targets = [Target.load(model_source("ckpt/off")), Target.load(model_source("ckpt/learned"))]
    grid = Grid(tasks=("ppl", "niah_single_2"), quants=("none", "w8a8_static"), contexts=(128, 512), yarn=4.0)
    records, skipped = evaluate(targets, grid)

A record is ``{"model", "vscale", "quant", "task", "context", "seed", "metric", "value"}``; ``seed`` is None where
the measurement does not depend on it (perplexity, lm-eval). A cell that cannot run here (a quantisation backend
that is not installed, needles in a vocabulary without text) is skipped with a one-line reason instead.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vscale_plugin.data import TOKENIZER_CACHE, Tokenizer, build_tokenizer, open_batches
from vscale_plugin.data.tokenizer import check_fits
from vscale_plugin.evaluate import niah, quant
from vscale_plugin.evaluate.models import ModelSource, load_model, native_context, vscale_mode
from vscale_plugin.evaluate.perplexity import perplexity
from vscale_plugin.evaluate.yarn import yarn
from vscale_plugin.launch.cli import UsageError

PPL = "ppl"
LM_EVAL = "lm_eval"  # the work item that runs every --lm_eval_tasks task of one (model, scheme)
TASKS = (PPL, *niah.TASKS)
# How many held-out documents the haystacks are cut from, at most: enough text for contexts of many thousand tokens.
_HAYSTACK_DOCS = 512


@dataclass(frozen=True)
class Grid:
    """What to evaluate; every field as the launcher's flag of the same name."""

    tasks: Sequence[str] = TASKS
    quants: Sequence[str] = quant.SCHEMES
    contexts: Sequence[int] | None = None  # None: each model's native context
    yarn: float | None = None  # the YaRN factor for contexts beyond the native one
    seeds: int = 5
    samples: int = 20  # NIAH samples per (task, context, seed)
    calib: int = 32  # calibration sequences for the static schemes
    ppl_windows: int = 64  # held-out windows (of the context) for perplexity, at most
    batch_size: int = 8  # windows (perplexity, calibration) and NIAH prompts per forward
    dataset: str | None = None  # None: each model's training dataset, else smoke
    lm_eval_tasks: Sequence[str] = ()
    lm_eval_limit: int | None = None

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise UsageError(f"--tasks {task}: unknown task; choose from {', '.join(TASKS)}")
        for scheme in self.quants:
            try:
                quant.check_scheme(scheme)
            except quant.QuantError as err:
                raise UsageError(f"--quant {scheme}: {err}") from err
        for flag in ("seeds", "samples", "ppl_windows", "batch_size"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} {getattr(self, flag)}: must be >= 1")
        if self.calib < 0:
            raise UsageError(f"--calib {self.calib}: must be >= 0")
        if self.calib == 0 and any(quant.needs_calibration(s) for s in self.quants):
            needing = ", ".join(s for s in self.quants if quant.needs_calibration(s))
            raise UsageError(f"--calib 0: {needing} calibrate on training sequences; pass --calib 32 (or more)")
        if self.yarn is not None and not self.yarn > 1:
            raise UsageError(f"--yarn {self.yarn:g}: the YaRN factor must be > 1 (4 extends the context 4x)")
        if self.contexts is not None and any(c < 2 for c in self.contexts):
            raise UsageError(f"--context {','.join(map(str, self.contexts))}: contexts must be >= 2 tokens")


@dataclass
class Target:
    """One model to evaluate, loaded, with what its cells read: tokenizer, dataset, native context."""

    source: ModelSource
    model: nn.Module
    tokenizer: Tokenizer
    dataset: str
    native: int
    _windows: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _calibration: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _haystack: list[str] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, source: ModelSource, dataset: str | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Target:  # fmt: skip
        dataset = dataset or source.dataset or "smoke"
        # A checkpoint trained with the default tokenizer of its dataset keeps that one on any evaluation data.
        tokenizer = build_tokenizer(source.tokenizer, source.dataset or dataset, TOKENIZER_CACHE)
        model = load_model(source, dtype=dtype).to(device)
        check_fits(tokenizer, model.config.vocab_size, f"--model {source.path}",
                   "pass the --tokenizer it was trained with", UsageError)  # fmt: skip
        return cls(source, model, tokenizer, dataset, native_context(model))

    @property
    def label(self) -> str:
        return self.source.label

    @property
    def vscale(self) -> str:
        return vscale_mode(self.model)

    def windows(self, context: int, count: int, batch_size: int) -> list[torch.Tensor]:
        """The first ``count`` held-out windows of ``context`` tokens, in batches (read once, then kept)."""
        if context not in self._windows:
            data = open_batches(self.dataset, self.tokenizer, context, batch_size, split="eval")
            self._windows[context] = list(itertools.islice(iter(data), -(-count // batch_size)))
        return self._windows[context]

    def calibration(self, count: int, batch_size: int) -> list[torch.Tensor]:
        """The first ``count`` training sequences of the native context, in batches: what a quantiser calibrates on.
        A training split that runs out first (and would repeat itself) is a UsageError."""
        if (count, batch_size) in self._calibration:
            return self._calibration[count, batch_size]
        data = open_batches(self.dataset, self.tokenizer, self.native, batch_size, split="train")
        batches = list(itertools.islice(iter(data), -(-count // batch_size)))
        if data.state_dict().get("position", {}).get("epoch", 0) > 0:
            data = open_batches(self.dataset, self.tokenizer, self.native, 1, split="train")
            distinct = sum(1 for _ in itertools.takewhile(lambda _: data.state_dict()["position"]["epoch"] == 0, data))
            raise UsageError(
                f"--calib {count}: --dataset {self.dataset} holds only {distinct} training sequences of {self.native} "
                f"tokens; pass --calib {distinct} or less, or a larger dataset"
            )
        self._calibration[count, batch_size] = list(torch.cat(batches)[:count].split(batch_size))
        return self._calibration[count, batch_size]

    def haystack(self) -> list[str]:
        """Held-out documents as text, the needles' haystack."""
        if self._haystack is None:
            data = open_batches(self.dataset, self.tokenizer, self.native, 1, split="eval")
            docs = itertools.islice(data.documents(), _HAYSTACK_DOCS)
            self._haystack = [text for tokens in docs if (text := self.tokenizer.decode(tokens[:-1].tolist()))]
        return self._haystack


@dataclass(frozen=True, order=True)
class Item:
    """One cell of the grid: ``model`` indexes the targets."""

    model: int
    quant: str
    context: int
    task: str
    seed: int | None


def contexts_of(target: Target, grid: Grid) -> list[int]:
    """The contexts ``target`` is evaluated at, checked against its positions (and the YaRN factor)."""
    contexts = list(grid.contexts) if grid.contexts else [target.native]
    reach = target.native * (grid.yarn or 1)
    for context in contexts:
        if context > reach:
            fix = (
                f"pass --yarn {-(-context // target.native)} to extend it with YaRN"
                if grid.yarn is None
                else f"raise --yarn to {context / target.native:g} or more"
            )
            raise UsageError(
                f"--context {context}: more than the {target.native} positions of --model {target.source.path}"
                f"{'' if grid.yarn is None else f' x YaRN factor {grid.yarn:g}'}; {fix}, or give a shorter context"
            )
    return contexts


def work_items(targets: Sequence[Target], grid: Grid) -> list[Item]:
    """Every cell of the grid, in a fixed order (the same on every rank)."""
    items = []
    for index, target in enumerate(targets):
        for scheme in grid.quants:
            for context in contexts_of(target, grid):
                for task in grid.tasks:
                    seeds = [None] if task == PPL else list(range(grid.seeds))
                    items.extend(Item(index, scheme, context, task, seed) for seed in seeds)
            if grid.lm_eval_tasks:
                items.append(Item(index, scheme, target.native, LM_EVAL, None))
    return items


def skip_reason(target: Target, item: Item) -> str | None:
    """Why ``item`` cannot run here, or None."""
    reason = quant.unavailable(item.quant)
    if reason:
        return f"{item.quant}: {reason}"
    if item.task in niah.TASKS and not target.tokenizer.has_text:
        return f"{item.task}: --dataset {target.dataset} has no text to hide needles in"
    return None


def evaluate(
    targets: Sequence[Target], grid: Grid, rank: int = 0, world_size: int = 1, progress: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, skipped cells' reasons) of the whole grid; this rank computes every ``world_size``-th item from the
    ``rank``-th and the records of all ranks are gathered (identical lists on every rank, in item order)."""
    items = work_items(targets, grid)
    mine = items[rank::world_size]
    # A rank's items grouped by (model, scheme), so that each quantised copy is made once.
    mine.sort(key=lambda item: (item.model, item.quant))
    done: list[tuple[Item, list[dict[str, Any]]]] = []
    skipped: list[str] = []
    # Calibration data read (and checked) up front on every rank, so that a bad --calib stops all ranks alike.
    if any(quant.needs_calibration(scheme) for scheme in grid.quants):
        for target in targets:
            target.calibration(grid.calib, grid.batch_size)
    with tqdm(total=len(mine), desc=f"evaluate (rank {rank})", unit="cell", disable=not progress or rank != 0) as bar:
        _run_share(targets, grid, mine, done, skipped, bar)
    if world_size > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (done, skipped))
        done = [entry for part in gathered for entry in part[0]]
        skipped = sorted({reason for part in gathered for reason in part[1]})
    order = {item: index for index, item in enumerate(items)}
    done.sort(key=lambda entry: order[entry[0]])
    return [record for _, records in done for record in records], sorted(set(skipped))


def _run_share(targets: Sequence[Target], grid: Grid, mine: list[Item], done: list, skipped: list[str], bar) -> None:
    """This rank's items, grouped by (model, scheme) so that each quantised copy is made once."""
    for (model_index, scheme), group in _groups(mine):
        target = targets[model_index]
        reasons = {item: skip_reason(target, item) for item in group}
        skipped += [f"{target.label}: {reason}" for reason in reasons.values() if reason]
        runnable = [item for item in group if not reasons[item]]
        quantised = _quantised(target, scheme, grid) if runnable else None
        for item in group:
            if item in runnable:
                try:
                    done.append((item, _run_item(target, quantised, item, grid)))
                except niah.ContextTooShort:
                    skipped.append(f"{target.label}: {item.task} at {item.context} tokens: too short for the task's "
                                   "template, needles and answer; evaluate it at a longer --context")  # fmt: skip
            bar.update()
        del quantised


def _groups(items: list[Item]) -> Iterator[tuple[tuple[int, str], list[Item]]]:
    group: list[Item] = []
    for item in items:
        if group and (group[0].model, group[0].quant) != (item.model, item.quant):
            yield (group[0].model, group[0].quant), group
            group = []
        group.append(item)
    if group:
        yield (group[0].model, group[0].quant), group


def _quantised(target: Target, scheme: str, grid: Grid) -> nn.Module:
    calibration = target.calibration(grid.calib, grid.batch_size) if quant.needs_calibration(scheme) else []
    device = next(target.model.parameters()).device
    return quant.quantize(target.model, scheme, [ids.to(device) for ids in calibration])


def _run_item(target: Target, model: nn.Module, item: Item, grid: Grid) -> list[dict[str, Any]]:
    base = {"model": target.label, "vscale": target.vscale, "quant": item.quant, "task": item.task,
            "context": item.context, "seed": item.seed}  # fmt: skip
    with _extended(model, item.context, target.native, grid.yarn):
        if item.task == PPL:
            windows = target.windows(item.context, grid.ppl_windows, grid.batch_size)
            result = perplexity(model, windows, target.tokenizer, max_windows=grid.ppl_windows)
            records = [{**base, "metric": "ppl", "value": result.ppl}]
            if result.bpb is not None:
                records.append({**base, "metric": "bpb", "value": result.bpb})
            return records
        if item.task == LM_EVAL:
            from vscale_plugin.evaluate.harness import hf_tokenizer, run_lm_eval

            tokenizer = hf_tokenizer(target.source.tokenizer, target.source.dataset or target.dataset)
            scores = run_lm_eval(model, tokenizer, grid.lm_eval_tasks, batch_size=grid.batch_size,
                                 limit=grid.lm_eval_limit, max_length=item.context)  # fmt: skip
            return [{**base, "task": task, "metric": metric, "value": value}
                    for task, metrics in scores.items() for metric, value in metrics.items()]  # fmt: skip
        samples = niah.make_samples(item.task, target.tokenizer, target.haystack(), item.context, grid.samples,
                                    seed=item.seed)  # fmt: skip
        accuracy = niah.evaluate_niah(model, target.tokenizer, samples, batch_size=grid.batch_size)
        return [{**base, "metric": "accuracy", "value": accuracy}]


def _extended(model: nn.Module, context: int, native: int, factor: float | None):
    """YaRN for contexts beyond the native one; the native context runs the model as trained."""
    if context <= native:
        return contextlib.nullcontext()
    assert factor is not None  # contexts_of refused contexts beyond the native one without --yarn
    return yarn(model, factor, native)
