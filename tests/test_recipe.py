"""The shipped presets and optimiser recipe against SPEC section 5, and the schedule against its formula."""

import math

import pytest

import vscale_plugin as vsp
from vscale_plugin.testing.models import tiny_model
from vscale_plugin.train.recipe import PRESETS, llama_config
from vscale_plugin.train.schedule import lr_lambda

# SPEC section 5: layers, hidden, heads, kv heads, head dim, MLP, context, peak lr, min lr
PAPER = {
    "0.1B": (16, 512, 8, 8, 64, 1408, 1024, 5e-4, 5e-5),
    "0.3B": (16, 1024, 8, 4, 128, 2816, 2048, 1e-3, 1e-4),
    "1B": (18, 2048, 16, 8, 128, 5504, 2048, 1e-3, 1e-4),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_the_spec_table(name):
    p = PRESETS[name]
    assert (p.layers, p.hidden, p.heads, p.kv_heads, p.head_dim, p.mlp, p.seq_len, p.lr, p.min_lr) == PAPER[name]
    assert (p.vocab_size, p.rms_norm_eps, p.rope_theta, p.global_batch, p.warmup) == (50257, 1e-5, 10000.0, 512, 1000)
    assert p.max_steps == (25000 if name == "1B" else 20000)
    assert (p.betas, p.eps, p.weight_decay, p.grad_clip) == ((0.9, 0.95), 1e-8, 0.1, 1.0)
    config = llama_config(p, p.vocab_size, eos_token_id=50256)
    assert config.model_type == "llama" and not config.tie_word_embeddings and config.bos_token_id is None
    assert config.head_dim * config.num_attention_heads == config.hidden_size


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    p = PRESETS["0.1B"].with_overrides(warmup=10, max_steps=110)
    factor = lr_lambda(p)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    floor = p.min_lr / p.lr
    for step in (10, 35, 60, 85, 110, 200):
        progress = min(1.0, (step - 10) / 100)
        assert factor(step) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    assert factor(110) * p.lr == pytest.approx(p.min_lr)


def test_weight_decay_spares_norms_biases_and_theta():
    model = vsp.apply_vscale(tiny_model("qwen2"))  # qwen2 has q/k/v biases
    decay, no_decay = vsp.decay_parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decayed | spared == set(names.values()) and not decayed & spared
    assert all("norm" in n or n.endswith(".bias") or "vscale" in n for n in spared)
    assert any("vscale" in n for n in spared) and any(n.endswith(".bias") for n in spared)
    assert "model.embed_tokens.weight" in decayed and "lm_head.weight" in decayed
