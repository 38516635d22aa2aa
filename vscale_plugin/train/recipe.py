"""The paper's training recipe (SPEC section 5) as presets, plus ``smoke``: tiny, offline, CPU-sized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Preset:
    """Model shape and optimisation recipe of one preset. ``vocab_size=None``: the tokenizer's."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    seq_len: int
    lr: float
    min_lr: float
    warmup: int
    max_steps: int
    global_batch: int
    micro_batch: int
    vocab_size: int | None = 50257  # GPT-2 tokenizer
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dataset: str = "smoke"  # the --dataset when none is given
    stats_per_run: int = 0  # statistics steps per run when --stats_every is not given (0: none)

    def default_stats_every(self, max_steps: int) -> int:
        """--stats_every when none is given: ``stats_per_run`` measurements over ``max_steps`` steps (0: none)."""
        return max(1, max_steps // self.stats_per_run) if self.stats_per_run else 0

    def with_overrides(self, **overrides: Any) -> Preset:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # smoke: a few minutes on 2 CPU cores with the offline corpus; vocabulary from its SentencePiece model
        Preset("smoke", layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, mlp=352, seq_len=128, lr=3e-3,
               min_lr=3e-4, warmup=20, max_steps=150, global_batch=16, micro_batch=4, vocab_size=None),
        # sinklab: the Bigram-Backcopy task, on which sinks, value drains and token-0 peaks form on 2 CPU cores in
        # minutes; chosen by measurement (benchmarks/sinklab_search.py, benchmarks/RESULTS.md "sinklab")
        Preset("sinklab", layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, mlp=256, seq_len=64, lr=1e-2,
               min_lr=1e-3, warmup=50, max_steps=3000, global_batch=32, micro_batch=16, vocab_size=None,
               weight_decay=0.01, dataset="bigram_backcopy", stats_per_run=10),
        Preset("0.1B", layers=16, hidden=512, heads=8, kv_heads=8, head_dim=64, mlp=1408, seq_len=1024, lr=5e-4,
               min_lr=5e-5, warmup=1000, max_steps=20000, global_batch=512, micro_batch=16),
        Preset("0.3B", layers=16, hidden=1024, heads=8, kv_heads=4, head_dim=128, mlp=2816, seq_len=2048, lr=1e-3,
               min_lr=1e-4, warmup=1000, max_steps=20000, global_batch=512, micro_batch=8),
        Preset("1B", layers=18, hidden=2048, heads=16, kv_heads=8, head_dim=128, mlp=5504, seq_len=2048, lr=1e-3,
               min_lr=1e-4, warmup=1000, max_steps=25000, global_batch=512, micro_batch=4),
    ]
}  # fmt: skip


def llama_config(preset: Preset, vocab_size: int, eos_token_id: int):
    """The LlamaConfig of a preset (SPEC 5: LlamaForCausalLM, RMSNorm eps 1e-5, RoPE base 10000, untied)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden,
        intermediate_size=preset.mlp,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.seq_len,
        rms_norm_eps=preset.rms_norm_eps,
        initializer_range=preset.init_std,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
    )
    return config
