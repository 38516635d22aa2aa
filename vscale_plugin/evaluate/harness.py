"""lm-evaluation-harness on an in-memory (possibly fake-quantised, possibly V-scaled) model: lm-eval's own
``simple_evaluate`` with ``HFLM(pretrained=model, tokenizer=...)``, so the model object is the one evaluated, not a
reload of its directory (which plain ``--model hf`` would build without V-scale). Optional: ``pip install
"vscale-plugin[eval]"``.

Offline: lm-eval's datasets come from the Hugging Face hub unless a task reads local files; our own task
``vsp_local_mc`` (a multiple-choice jsonl shipped in the package, :func:`local_tasks`) needs nothing from the
network, and ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` keep everything else from trying.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece
from torch import nn
from transformers import PreTrainedTokenizer, PreTrainedTokenizerBase

from vscale_plugin.data import TOKENIZER_CACHE, DataError, build_tokenizer
from vscale_plugin.data.bigram_backcopy import is_bigram_backcopy

INSTALL = 'pip install "vscale-plugin[eval]"'
LOCAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
LOCAL_TASK = "vsp_local_mc"
# lm-eval resolves a task's data_files from the working directory, not from its YAML: the YAML is written at run time
# with the absolute path of the shipped jsonl.
_LOCAL_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


class HarnessMissing(RuntimeError):
    """lm-evaluation-harness is not installed."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise HarnessMissing(f"lm-evaluation-harness is not installed ({err}): {INSTALL}") from err
    return lm_eval, HFLM, TaskManager


class SentencePieceTokenizer(PreTrainedTokenizer):
    """A SentencePiece ``.model`` as a transformers tokenizer (what HFLM takes), with the ids of
    ``vscale_plugin.data``'s own: no BOS, the model's EOS."""

    vocab_files_names: dict[str, str] = {}  # noqa: RUF012 - transformers reads it from the class
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, model_file: str | Path, **kwargs: Any) -> None:
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        eos, unk = self.processor.eos_id(), self.processor.unk_id()
        super().__init__(eos_token=self.processor.id_to_piece(eos),
                         unk_token=self.processor.id_to_piece(unk) if unk >= 0 else None, **kwargs)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.processor.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.processor.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.processor.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.processor.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.processor.decode_pieces(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


def hf_tokenizer(spec: str | None, dataset: str) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of ``build_tokenizer(spec, dataset)``: the same ids (no BOS) and EOS."""
    if is_bigram_backcopy(dataset):
        raise DataError(f"--dataset {dataset} has its own vocabulary and no text: lm-eval tasks cannot run on it")
    ours = build_tokenizer(spec, dataset, TOKENIZER_CACHE)  # checks the spec, trains the smoke model if needed
    if spec is None and dataset == "smoke":
        spec = str(next(TOKENIZER_CACHE.glob(ours.name.removeprefix("smoke:"))))
    if spec is not None and spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    from transformers import AutoTokenizer

    from vscale_plugin.data.hub import offline_for

    name = spec or "gpt2"
    local = Path(name).expanduser()
    return AutoTokenizer.from_pretrained(str(local) if local.exists() else name,
                                         local_files_only=offline_for(name) is not None)  # fmt: skip


def local_tasks(directory: str | Path) -> Path:
    """Write our offline lm-eval task(s) into ``directory`` (for ``TaskManager(include_path=...)``) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = (LOCAL_TASKS_DIR / f"{LOCAL_TASK}.jsonl").resolve()
    (directory / f"{LOCAL_TASK}.yaml").write_text(_LOCAL_YAML.format(task=LOCAL_TASK, data=data))
    return directory


def harness_results(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
    max_length: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's whole ``simple_evaluate`` answer for ``tasks`` on ``model`` (our local task always available)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(local_tasks(Path(tmp) / "vsp"))] + ([str(include_path)] if include_path else [])
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"--lm_eval_tasks {','.join(unknown)}: not an lm-eval task here; `lm_eval ls tasks` lists "
                             f"them, {LOCAL_TASK} runs offline")  # fmt: skip
        device = device or str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                       log_samples=log_samples, bootstrap_iters=0)  # fmt: skip


def run_lm_eval(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], **kwargs: Any
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``, ...; the ``,none`` filter
    suffix dropped); ``kwargs`` as for :func:`harness_results`."""
    results = harness_results(model, tokenizer, tasks, **kwargs)["results"]
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        metrics = {}
        for key, value in results[task].items():
            metric, filtered, _ = key.partition(",")  # metrics carry their filter ("acc,none"); bookkeeping does not
            if filtered and isinstance(value, int | float) and "stderr" not in metric:
                metrics[metric] = float(value)
        out[task] = metrics
    return out
