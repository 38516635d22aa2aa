"""The seeded initial weights of train/model.py: a function of (seed, parameter name) alone, with transformers' own
init distribution. Across ZeRO stages and world sizes: tests/test_init_across_zero.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import vscale_plugin as vsp
from vscale_plugin.testing.models import tiny_config
from vscale_plugin.train.model import init_weights, new_model, parameter_seed


def test_each_tensor_depends_only_on_the_seed_and_its_name():
    torch.manual_seed(123)  # the global RNG plays no part
    two_layers = new_model(tiny_config("llama", num_hidden_layers=2), seed=5)
    torch.manual_seed(456)
    four_layers = dict(new_model(tiny_config("llama", num_hidden_layers=4), seed=5).named_parameters())
    for name, p in two_layers.named_parameters():  # same names, other modules around them: same tensors
        assert torch.equal(p, four_layers[name]), name
    other_seed = dict(new_model(tiny_config("llama", num_hidden_layers=2), seed=6).named_parameters())
    random = [n for n, p in two_layers.named_parameters() if p.dim() == 2]
    assert random and all(not torch.equal(dict(two_layers.named_parameters())[n], other_seed[n]) for n in random)


def test_parameter_seed_is_fixed_across_processes_and_versions():
    # A change here changes every run's initial weights: such a change must be deliberate.
    assert parameter_seed(0, "model.embed_tokens.weight") == 2045469590490294478
    assert parameter_seed(1, "model.embed_tokens.weight") != parameter_seed(0, "model.embed_tokens.weight")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_distribution_is_transformers_init_weights(model_type):
    config = tiny_config(model_type, hidden_size=64, intermediate_size=128, initializer_range=0.05)
    torch.manual_seed(0)
    transformers_init = dict(AutoModelForCausalLM.from_config(config).named_parameters())
    seeded = dict(init_weights(AutoModelForCausalLM.from_config(config), seed=0).named_parameters())
    assert seeded.keys() == transformers_init.keys()
    assert any(n.endswith(".bias") for n in seeded) == (model_type == "qwen2")
    for name, p in seeded.items():
        reference = transformers_init[name]
        if torch.all(reference == 1) or torch.all(reference == 0):  # norms, biases
            assert torch.equal(p, reference), name
            continue
        rows = p[1:] if name.endswith("embed_tokens.weight") else p  # row 0 is the padding row (pad_token_id 0)
        assert not torch.equal(p, reference), name
        assert rows.mean().abs() < 0.1 * 0.05, name
        assert rows.std().item() == pytest.approx(0.05, rel=0.1), name
    # transformers zeroes the padding row of the embedding; so does the seeded init
    embedding = "model.embed_tokens.weight"
    assert config.pad_token_id == 0
    assert torch.all(seeded[embedding][0] == 0) and torch.all(transformers_init[embedding][0] == 0)


def test_a_module_without_a_rule_is_refused_by_name():
    model = vsp.apply_vscale(AutoModelForCausalLM.from_config(tiny_config("llama")))  # theta: V-scale's own init
    with pytest.raises(TypeError, match=r"model\.layers\.0\.self_attn\.vscale \(VScale\).*_init_weights"):
        init_weights(model, seed=0)
