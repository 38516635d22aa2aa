"""Tiny Hugging Face decoders for tests: every supported architecture in a few thousand parameters."""

from __future__ import annotations

from typing import Any

# Extra settings that keep mixture-of-experts and other families tiny; everything else shares TINY.
_EXTRA: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma2": {"query_pre_attn_scalar": 8, "sliding_window": 16},
}

TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    # Family defaults point at real vocabularies (ids up to 151k); keep special tokens inside the tiny one.
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_config(model_type: str = "llama", **overrides: Any):
    """A transformers config of ``model_type`` with tiny shapes; ``overrides`` win."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY, **_EXTRA.get(model_type, {}), **overrides})


def tiny_model(model_type: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides: Any):
    """A randomly initialised tiny causal LM in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def randomise_theta(model, seed: int = 2, low: float = -1.5, high: float = 1.5):
    """Spread every learned V-scale theta uniformly: theta = 0 (lambda = 1) is a special point, and tests want
    every head to have its own C. Returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vscale" in name:
                p.copy_(torch.empty(p.shape).uniform_(low, high, generator=g))
    return model
