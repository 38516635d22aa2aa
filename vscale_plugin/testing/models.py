"""Tiny Hugging Face decoders for tests: every supported architecture in a few thousand parameters."""

from __future__ import annotations

from typing import Any

# A sliding window shorter than the tests' sequences (48-80 tokens), so that it changes the attention, yet long
# enough (> 0.4 * 64 positions) for a planted sink to keep its score alpha = mean_{t<64} a_t0 clear of 0.3.
SLIDING_WINDOW = 40

# Extra settings per family: mixture-of-experts kept tiny, and each family's peculiarity switched on with values
# far from the identity (sliding windows, NoPE layers, Granite's multipliers, Gemma 2's soft-capping), so that a
# statistic that ignores one of them is visibly wrong. Everything else shares TINY.
_EXTRA: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": SLIDING_WINDOW},
    "ministral": {"sliding_window": SLIDING_WINDOW},  # every layer sliding (layer_types follows sliding_window)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": SLIDING_WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},  # layers >= 1
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "use_sliding_window": True,  # layers 0, 2, ... slide
        "sliding_window": SLIDING_WINDOW,
    },
    "qwen3": {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # scaling 16**-0.5, not head_dim**-0.5; layers 0, 2, ... slide; caps low enough to bend tiny models' values
    "gemma2": {
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "attn_logit_softcapping": 8.0,
        "final_logit_softcapping": 1.0,
    },
    # Granite 3's muP-style multipliers (attention_multiplier 1/head_dim instead of head_dim**-0.5)
    "granite": {
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.125,
        "logits_scaling": 8.0,
    },
    "starcoder2": {"sliding_window": SLIDING_WINDOW},
    "smollm3": {"no_rope_layer_interval": 2},  # layers 1, 3, ... are NoPE
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
