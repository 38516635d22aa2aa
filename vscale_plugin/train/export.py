"""``<save_dir>/hf/``: the trained model as a Hugging Face directory, beside the DeepSpeed checkpoints, for whoever
uses the model rather than continues the run (``vsp.from_pretrained``, plain ``AutoModelForCausalLM`` with
``trust_remote_code=True``, ``launchers/analyze.py`` and ``evaluate.py``, lm-eval's ``--model hf``).

What it holds: the consolidated weights by the model's own ``save_pretrained`` (safetensors; a V-scale model's
config keeps ``vscale`` and theta is in the weights), the run's tokenizer (``AutoTokenizer`` loads it; none for a
tokenizer without text, such as bigram_backcopy's, which README.md there says), and the generation config (EOS the
tokenizer's, the packer's separator; padding with it).

Weights in the dtype the model computed with: float32 for an fp32 run, exactly the weights the optimiser holds;
bfloat16 for a bf16 run, the weights its forward passes used (the fp32 master weights stay in the DeepSpeed
checkpoint, which ``vscale_plugin.evaluate.models.load_training_checkpoint`` consolidates in float32).

The export replaces ``hf/`` as a whole: it is written into ``hf.partial/`` and renamed into place, the previous
one moved aside to ``hf.previous/`` for the moment between the two renames and removed after. A crash while writing
leaves the old ``hf/`` as it was; one between the renames leaves ``hf.previous/``, which the next export puts back
before it starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from vscale_plugin.data import Tokenizer

HF_DIR = "hf"
_PARTIAL = "hf.partial"
_PREVIOUS = "hf.previous"
_NO_TOKENIZER = """# No tokenizer

This model was trained on `{dataset}`, a synthetic vocabulary of {vocab} ids without text, so there is no tokenizer
to save: feed it token ids (EOS, the sequence separator, is id {eos}).
"""


def export_hf(engine, save_dir: Path, rank: int, tokenizer: Tokenizer, dataset: str) -> Path:
    """Write ``save_dir/hf/`` from the DeepSpeed ``engine`` (any ZeRO stage) and return its path. A collective:
    every rank calls it (ZeRO-3 gathers the partitioned parameters one module at a time); rank 0 alone writes."""
    if engine.zero_optimization_partition_weights() or getattr(engine, "autotp_size", lambda: 1)() > 1:
        # Gathers ZeRO-3 partitions and AutoTP shards (whole matrices, on rank 0; None elsewhere), in the module's
        # dtype despite its name. DeepSpeed 0.19.8 has no public call for it: save_16bit_model writes one TP rank's
        # shards under ZeRO-1/2.
        state_dict = engine._consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    target = Path(save_dir) / HF_DIR
    if rank == 0:
        write_atomically(target, lambda directory: save_hf(engine.module, state_dict, directory, tokenizer, dataset))
    dist.barrier()
    return target


def save_hf(model: nn.Module, state_dict: dict[str, Any], directory: Path, tokenizer: Tokenizer, dataset: str) -> None:
    """``model``'s ``save_pretrained`` with ``state_dict``, the tokenizer (or a README.md saying why there is none)
    and the generation config, into ``directory``."""
    from transformers import GenerationConfig

    config = model.config
    use_cache = config.use_cache
    config.use_cache = True  # training turned the KV cache off; generation from the export wants it
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        config.use_cache = use_cache
    if not tokenizer.save_pretrained(directory):
        (directory / "README.md").write_text(
            _NO_TOKENIZER.format(dataset=dataset, vocab=tokenizer.vocab_size, eos=tokenizer.eos_id)
        )
    GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None), eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id
    ).save_pretrained(directory)


def write_atomically(target: Path, write) -> None:
    """Call ``write(directory)`` on a new directory, then put it in place of ``target``; ``target`` is never half
    written: until the renames, an existing ``target`` stays as it was."""
    partial, previous = target.with_name(_PARTIAL), target.with_name(_PREVIOUS)
    if previous.is_dir() and not target.exists():
        previous.rename(target)  # a crash between the renames below: the previous export is back
    shutil.rmtree(partial, ignore_errors=True)  # a crash while writing
    shutil.rmtree(previous, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
