"""V-scale under DeepSpeed Ulysses sequence parallelism (``UlyssesSPAttentionHF``, DeepSpeed's ALST for HF models).

Each rank of a sequence-parallel (SP) group holds ``T / sp`` consecutive positions of every sequence. Everything but
the attention kernel runs on that shard: embeddings, norms, MLPs, the q/k/v projections and so V-scale, which scales
each token's value vector on its own and needs no change. Around the kernel an all-to-all turns the shards into the
full sequence for ``heads / sp`` of the heads, and back. Ulysses does this by replacing the model's attention
function (``ALL_ATTENTION_FUNCTIONS[impl]``), and it drops the model's attention mask there: sdpa runs with
``is_causal`` over the gathered sequence, flex_attention with a plain causal block mask.

That makes several set-ups silently wrong rather than failing, which :func:`check_sequence_parallel` (model and SP
size, before anything is built) and :func:`check_sequence_parallel_batch` (a batch) turn into one clear error:

- ``eager`` attention: Ulysses refuses it (it needs a 4-D mask); sdpa, flex_attention or a flash attention.
- the number of attention heads not divisible by the SP size; KV heads neither divisible by it nor dividing it (KV
  heads are repeated when there are fewer of them than ranks).
- sliding-window (or chunked) attention layers under sdpa / flex_attention: the window lives in the dropped mask, so
  the layers attend to the whole causal past (measured: logits off by 0.1 on a tiny Mistral). Flash attention gets
  the window as an argument and keeps it.
- recurrent (linear-attention) layers: their state never crosses the shards.
- a batch without ``position_ids``: HF then numbers every shard's positions from 0, so RoPE is wrong on every rank
  but the first, with no error (DeepSpeed's own check only asks that *some* position ids reach the attention).
- a padding ``attention_mask`` (any 0): dropped, so padded tokens are attended to.
- a sequence length not divisible by the SP size.
- DeepSpeed older than :data:`MIN_DEEPSPEED`; ZeRO-3 with ``reduce_scatter: false`` before 0.20.2.

:func:`sequence_parallel_loss` combines the shards' losses as the HF Trainer does (token-weighted mean over the SP
group, each rank back-propagating its own share: ZeRO-1/2 sum gradients over the SP group; ZeRO-3 before DeepSpeed
0.20.2 averages them, which the loss makes up for).

The statistics collector combines its numbers over the SP group of the engine it is given
(:mod:`vscale_plugin.stats.collector`); :func:`sequence_parallel_size` tells it (or anyone) that a model or engine runs
under Ulysses, so that a bare model under Ulysses is refused rather than measured shard by shard as whole sequences.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

# UlyssesSPAttentionHF appeared in DeepSpeed 0.17; Accelerate (and so the HF Trainer) requires 0.18.2 for it.
MIN_DEEPSPEED = "0.18.2"
# What Ulysses itself refuses (it needs the model to work without its 4-D attention mask).
REFUSED_ATTENTION = ("eager", "paged|eager")
# From this version ZeRO-3 sums gradients over the SP group as ZeRO-1/2 do (transformers 5.25 relies on it).
ZERO3_SUMS_SP_FROM = "0.20.2"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def _keeps_sliding_window(attn_implementation: str) -> bool:
    # transformers' flash-attention paths (flash_attention_2/3, hub kernels such as kernels-community/flash-attn2)
    # take the window as an argument, which Ulysses passes on; sdpa and flex_attention have it only in the mask.
    return "flash" in attn_implementation


def _masked_layer_types(model: Any) -> list[tuple[int, str]]:
    """(layer, kind) of every layer whose attention pattern is not plain causal: 'sliding_attention', 'chunked_...'
    or 'linear_attention' (recurrent); read the way the model builds its masks."""
    from vscale_plugin.hf.registry import REGISTRY, _sliding_window

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    arch = REGISTRY.get(getattr(config, "model_type", None))
    layer_types = getattr(config, "layer_types", None)
    found = []
    for i in range(layers):
        kind = layer_types[i] if layer_types is not None and i < len(layer_types) else "full_attention"
        if kind == "full_attention":
            if arch is not None:
                windowed = _sliding_window(arch, config, i) is not None
            else:  # not one of V-scale's architectures: a config-wide window unless layer_types said otherwise
                windowed = layer_types is None and getattr(config, "sliding_window", None) is not None
                windowed = windowed and getattr(config, "use_sliding_window", True) is not False
            kind = "sliding_attention" if windowed else kind
        if kind != "full_attention":
            found.append((i, kind))
    return found


def check_sequence_parallel(
    model: Any,
    sp_size: int,
    attn_implementation: str | None = None,
    world_size: int | None = None,
    ds_config: Mapping[str, Any] | None = None,
    deepspeed_version: str | None = None,
) -> None:
    """Refuse, with one ValueError naming every problem and its fix, a Hugging Face ``model`` that DeepSpeed Ulysses
    with ``sp_size`` ranks per sequence would refuse later or train wrongly. Call it before
    ``UlyssesSPAttentionHF.register_with_transformers`` (and before ``deepspeed.initialize``); nothing is changed.

    ``attn_implementation`` is the ``core_attn_implementation`` you will pass to Ulysses (default: the model's own,
    ``model.config._attn_implementation``); ``world_size`` the number of ranks when known; ``ds_config`` the DeepSpeed
    config (ZeRO-3 with ``reduce_scatter: false`` mixes summed and averaged gradients); ``deepspeed_version``
    overrides the installed version (for tests). ``sp_size`` 1 checks nothing.
    """
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sequence parallel size must be a positive integer; got {sp_size!r}")
    if sp_size == 1:
        return
    problems: list[str] = []

    if deepspeed_version is None:
        try:
            deepspeed_version = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            deepspeed_version = None
            problems.append(
                f"DeepSpeed is not installed; Ulysses sequence parallelism is part of it: "
                f"pip install 'deepspeed>={MIN_DEEPSPEED}'"
            )
    if deepspeed_version is not None and _version_tuple(deepspeed_version) < _version_tuple(MIN_DEEPSPEED):
        problems.append(
            f"DeepSpeed {deepspeed_version} is too old for Ulysses sequence parallelism of HF models "
            f"(UlyssesSPAttentionHF came in 0.17; Accelerate requires {MIN_DEEPSPEED}): "
            f"pip install -U 'deepspeed>={MIN_DEEPSPEED}'"
        )

    zero = dict((ds_config or {}).get("zero_optimization") or {})
    if (
        deepspeed_version is not None
        and int(zero.get("stage", 0)) == 3
        and not zero.get("reduce_scatter", True)
        and zero.get("contiguous_gradients", True)
        and zero3_averages_over_sequence_parallel(3, deepspeed_version)
    ):
        problems.append(
            f"ZeRO-3 with reduce_scatter false and contiguous_gradients true on DeepSpeed {deepspeed_version} sums "
            "some gradients over the SP group and averages others (by bucket), which no loss scaling can undo: "
            f"remove reduce_scatter: false from zero_optimization, or upgrade to deepspeed>={ZERO3_SUMS_SP_FROM}"
        )

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"Ulysses sequence parallelism wraps Hugging Face models (with a .config); got {type(model).__name__}"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_attn = getattr(config, "_attn_implementation", None)
    attn = attn_implementation or model_attn or "eager"
    if model_attn is not None and attn_implementation is not None and attn_implementation != model_attn:
        problems.append(
            f"the model was built with attn_implementation={model_attn!r} but Ulysses would wrap "
            f"{attn_implementation!r}, so it would never see the model's attention: load the model with "
            f"attn_implementation={attn_implementation!r} or pass core_attn_implementation={model_attn!r}"
        )
    if attn in REFUSED_ATTENTION:
        problems.append(
            f"attn_implementation {attn!r} cannot run under Ulysses (it needs a 4-D attention mask, which Ulysses "
            "drops; DeepSpeed refuses it): load the model with attn_implementation='sdpa' (or 'flex_attention', "
            "'flash_attention_2' on GPUs)"
        )

    if world_size is not None and (world_size < sp_size or world_size % sp_size):
        problems.append(
            f"{world_size} ranks cannot be split into sequence-parallel groups of {sp_size}: use a sequence "
            f"parallel size that divides the number of ranks ({world_size})"
        )

    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    if heads % sp_size:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        problems.append(
            f"{heads} attention heads cannot be split over {sp_size} sequence-parallel ranks (each rank computes "
            f"heads/sp of them on the full sequence): use a sequence parallel size that divides {heads} "
            f"({', '.join(map(str, divisors)) or 'none above 1'})"
        )
    if kv_heads % sp_size and sp_size % kv_heads:
        problems.append(
            f"{kv_heads} KV heads neither split over {sp_size} sequence-parallel ranks nor repeat evenly onto them: "
            f"use a sequence parallel size that divides {kv_heads} or is a multiple of it"
        )

    masked = _masked_layer_types(model)
    recurrent = [i for i, kind in masked if "linear" in kind]
    if recurrent:
        problems.append(
            f"layers {recurrent} are recurrent (linear attention): their state is not exchanged between the "
            "sequence shards, so every rank restarts it and the gradients are wrong: sequence parallelism needs "
            "a model whose layers all use softmax attention"
        )
    windowed = [(i, kind) for i, kind in masked if "linear" not in kind]
    sliding_only = all(kind == "sliding_attention" for _, kind in windowed)
    if windowed and not (sliding_only and _keeps_sliding_window(attn)):
        kinds = sorted({kind for _, kind in windowed})
        problems.append(
            f"layers {[i for i, _ in windowed]} use {'/'.join(kinds)} whose pattern {attn!r} attention only has in "
            "the attention mask, which Ulysses drops (they would attend to the whole causal past): use "
            "attn_implementation='flash_attention_2' (it takes the window as an argument), or train without "
            "sequence parallelism"
        )

    if problems:
        raise ValueError(
            f"Ulysses sequence parallelism (size {sp_size}) for {type(model).__name__}: " + "; ".join(problems)
        )


def check_sequence_parallel_batch(batch: Mapping[str, Any], sp_size: int) -> None:
    """Refuse a batch (as the data loader gives it, before :class:`UlyssesSPDataLoaderAdapter` shards it) that Ulysses
    would train on wrongly without an error: no ``position_ids``, a padding ``attention_mask``, or a sequence length
    not divisible by ``sp_size``."""
    problems = []
    ids = batch.get("input_ids")
    if ids is None:
        raise ValueError(f"a sequence-parallel batch needs input_ids; got keys {sorted(batch)}")
    length = ids.shape[-1]
    if "position_ids" not in batch:
        problems.append(
            "it has no position_ids: each rank would number its shard from 0, so RoPE is wrong on every rank but "
            "the first (no error is raised): add position_ids = torch.arange(seq_len) per row (restarting at "
            "document boundaries when sequences are packed) in the collator"
        )
    elif tuple(batch["position_ids"].shape[-1:]) != (length,):
        problems.append(
            f"position_ids have shape {tuple(batch['position_ids'].shape)} but input_ids {tuple(ids.shape)}: "
            "give one position per token"
        )
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and not bool(mask.bool().all()):
        problems.append(
            "its attention_mask pads tokens, but Ulysses drops the mask (padded tokens would be attended to): pack "
            "sequences to full length instead of padding (position_ids restarting at each document), or label "
            "padding -100 and mask nothing"
        )
    if length % sp_size:
        problems.append(
            f"its sequence length {length} is not divisible by the sequence parallel size {sp_size}: pad or pack "
            f"to a multiple of {sp_size}"
        )
    if problems:
        raise ValueError(f"batch for Ulysses sequence parallelism (size {sp_size}): " + "; ".join(problems))


def sequence_parallel_size(model_or_engine: Any) -> int:
    """How many Ulysses ranks share each sequence that ``model_or_engine`` sees: a DeepSpeed engine's
    ``sequence_parallel_size``, or for a bare model, the SP size of the Ulysses wrapper that
    ``UlyssesSPAttentionHF.register_with_transformers`` put in place of its attention function (process-wide, in
    transformers' ``ALL_ATTENTION_FUNCTIONS``); 1 without sequence parallelism. For code that must not mistake one
    rank's sequence shard for whole sequences (the statistics collector)."""
    size = getattr(model_or_engine, "sequence_parallel_size", None)
    if isinstance(size, int) and size > 1:
        return size
    model = getattr(model_or_engine, "module", model_or_engine)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None:
        return 1
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return 1
    function = ALL_ATTENTION_FUNCTIONS.get(impl)
    code, closure = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or not closure:
        return 1
    # Ulysses' wrapper is a closure over its UlyssesSPAttentionHF module, named uattn
    cells = dict(zip(code.co_freevars, closure, strict=True))
    ulysses = cells["uattn"].cell_contents if "uattn" in cells else None
    if type(ulysses).__name__ == "UlyssesSPAttentionHF":
        return int(ulysses.world_size)
    return 1


def zero3_averages_over_sequence_parallel(zero_stage: int, deepspeed_version: str | None = None) -> bool:
    """Whether DeepSpeed divides gradients by the SP size as well as summing them over the SP group: ZeRO-3 before
    0.20.2 (its default reduce-scatter averages over the whole sequence-data-parallel group; measured on 0.19.8,
    where theta's gradient came out half of a run without SP; deepspeedai/DeepSpeed#8854 made it sum). ZeRO-1/2
    sum over the SP group and average over data-parallel replicas only."""
    if zero_stage != 3:
        return False
    version = deepspeed_version or importlib.metadata.version("deepspeed")
    return _version_tuple(version) < _version_tuple(ZERO3_SUMS_SP_FROM)


def sequence_parallel_loss(
    loss: torch.Tensor, shift_labels: torch.Tensor, group: Any, zero_stage: int = 0, ignore_index: int = -100
) -> torch.Tensor:
    """The loss of the whole sequences from one shard's mean loss (``loss``, over the shard's ``shift_labels`` that
    are not ``ignore_index``): its value is the token-weighted mean over the SP ``group`` (the same on every rank),
    its gradient this shard's share of it, ``sum_shard / tokens_total``. DeepSpeed sums gradients over the SP group,
    so the ranks' shares add up to the whole sequences' gradient (averaged over data-parallel replicas as usual);
    where it averages over the SP group instead (``zero_stage`` 3, see :func:`zero3_averages_over_sequence_parallel`)
    the share is scaled by the SP size to make up for it. This is what the HF Trainer does
    (``transformers.integrations.deepspeed.deepspeed_sp_compute_loss``). A shard without a labelled token adds
    nothing. A collective over ``group``."""
    count = (shift_labels != ignore_index).sum()
    local_sum = torch.where(count > 0, loss.float(), torch.zeros((), device=loss.device)) * count
    totals = torch.stack((local_sum.detach(), count.to(local_sum.dtype)))
    dist.all_reduce(totals, group=group)
    share = local_sum
    if zero3_averages_over_sequence_parallel(zero_stage):
        share = local_sum * dist.get_world_size(group)
    return (share + (totals[0] - share.detach())) / totals[1].clamp(min=1)
