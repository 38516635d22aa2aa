"""The model a run trains: a preset's Llama with seeded initial weights (or the ``--init_from`` model's own), then
V-scale and activation checkpointing; under ZeRO-3 (without tensor parallelism) built straight into partitions."""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

import vscale_plugin
from vscale_plugin.data import DataError, Tokenizer
from vscale_plugin.data.hub import offline_for
from vscale_plugin.data.tokenizer import check_fits
from vscale_plugin.train.config import RunConfig
from vscale_plugin.train.recipe import llama_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def check_vocabulary(config: RunConfig, tokenizer: Tokenizer) -> None:
    """A DataError when ``tokenizer`` has ids beyond the vocabulary of the model ``config`` trains, before it is
    built (from the --init_from model's config alone)."""
    if config.init_from is not None:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(
            config.init_from, local_files_only=offline_for(config.init_from) is not None
        ).vocab_size
        check_fits(tokenizer, vocab, config.init_from, "use the model's own tokenizer (--tokenizer)")
        return
    recipe = config.recipe
    if recipe.vocab_size is not None and tokenizer.vocab_size > recipe.vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but preset {recipe.name} has "
            f"a {recipe.vocab_size}-token vocabulary; use a tokenizer with at most {recipe.vocab_size} (the paper's: "
            "gpt2)"
        )


def build_model(config: RunConfig, tokenizer: Tokenizer) -> nn.Module:
    """The model of ``config`` in training mode, V-scale applied (or removed for ``--vscale off``), ready for
    ``deepspeed.initialize``; :func:`check_vocabulary` has checked that ``tokenizer`` fits it."""
    recipe = config.recipe
    zero3 = None
    # Under AutoTP the model is built whole on every rank and DeepSpeed partitions it (TP shards, then ZeRO-3 over
    # the data-parallel ranks). Built into ZeRO-3 partitions first, it would be partitioned over all ranks, TP groups
    # included, which AutoTP's layer replacement is not verified with.
    if config.zero_stage == 3 and config.tensor_parallel == 1:
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers builds (or loads) the model straight into ZeRO-3 partitions under
        # zero.Init, with RoPE buffers in float32 even when the partitions are bf16.
        zero3 = HfDeepSpeedConfig(config.ds_config)
    if config.init_from is not None:
        dtype = torch.bfloat16 if config.bf16 else torch.float32
        model = vscale_plugin.from_pretrained(
            config.init_from,
            attn_implementation=config.attn_implementation,
            dtype=dtype,
            local_files_only=offline_for(config.init_from) is not None,
        )
    else:
        vocab = recipe.vocab_size or tokenizer.vocab_size
        model = new_model(llama_config(recipe, vocab, tokenizer.eos_id), config.seed, config.attn_implementation)
    del zero3
    if config.vscale != "off":
        vscale_plugin.apply_vscale(model, mode=config.vscale, sigma=recipe.init_std, kernel=config.vscale_kernel)
    elif vscale_plugin.is_vscaled(model):
        vscale_plugin.remove_vscale(model)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def new_model(model_config: PretrainedConfig, seed: int, attn_implementation: str = "sdpa") -> nn.Module:
    """A new causal LM of ``model_config`` (a transformers config) with the initial weights of ``seed``: the same
    tensors whether it is built plainly or under ZeRO-3 (``HfDeepSpeedConfig`` alive), on any number of ranks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)
    return init_weights(model, seed)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of ``model`` with its seeded initial value, in place; returns ``model``.

    Why not transformers' own init: it draws every tensor from the one global RNG in module order, after whatever
    construction drew before, and under ZeRO-3 (``zero.Init``) construction skips its default init and only rank 0
    runs the HF init on gathered modules. The same ``--seed`` therefore gave another model under ZeRO-3 than under
    ZeRO 0-2 (step-1 loss 8.3358 vs 8.3543 at the smoke preset).

    Here each parameter has a generator of its own, seeded from ``seed`` and the parameter's name
    (:func:`parameter_seed`), and its values are drawn on the CPU in float32 from that generator alone, then copied
    into the parameter (cast to its dtype, moved to its device). Its value is thus a function of (seed, name, shape)
    only: independent of the ZeRO stage, the number of ranks, the module order, the global RNG and the device.
    The distribution is transformers' ``_init_weights`` of these modules (the paper's init): Linear and Embedding
    weights N(0, initializer_range), biases 0, norm weights 1 (an Embedding's padding row 0).

    Why not a seed checkpoint (torchtitan's: create the weights once, save, load): it costs a full model on some
    rank and a disk round trip of every weight, for every run. Under ZeRO-3 here one module's parameters at a time
    are gathered (``GatheredParameters(..., modifier_rank=0)``), filled on rank 0 and scattered back into the
    partitions, so no rank ever holds more than the largest module in full (the embedding: 0.2 GB in bf16 at 1B)
    on top of its partitions. Drawing on the CPU gives the same float32 values on CPU and GPU machines (a bf16 run
    rounds them once, as DeepSpeed's cast of a plain model does); at 1B that is a few seconds once per run. Under
    ZeRO-3, transformers' own init pass runs before this one (it comes with building into partitions) and is
    overwritten.

    Modules with parameters of another kind are refused (their init is model-specific); V-scale is applied after
    this, so its theta keeps its own zero init.
    """
    std = model.config.initializer_range
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    fills = not zero3 or dist.get_rank() == 0
    done: set[int] = set()  # a tied weight is one tensor under two names: initialise it once
    for module_name, module in model.named_modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in done}
        if not params:
            continue
        kind = _kind(module, module_name)
        done.update(id(p) for p in params.values())
        gathered = contextlib.nullcontext()
        if zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        with gathered:
            if fills:
                for name, p in params.items():
                    p.copy_(_initial_value(kind, name, f"{module_name}.{name}", p.shape, seed, std))
                if kind == "embedding" and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
    return model


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: a hash of the run's seed and the parameter's full name (stable across
    processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _kind(module: nn.Module, name: str) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' own test: every model family has its own RMSNorm/LayerNorm class
    if "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
        return "norm"
    raise TypeError(
        f"seeded init has no rule for {name or 'the model'} ({type(module).__name__}); add one to "
        "vscale_plugin/train/model.py:_initial_value following that model's _init_weights in transformers"
    )


def _initial_value(
    kind: str, param_name: str, full_name: str, shape: torch.Size, seed: int, std: float
) -> torch.Tensor:
    if param_name == "bias":
        return torch.zeros(shape)
    if kind == "norm":
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, full_name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
