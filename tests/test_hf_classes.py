"""Weight decay that spares theta (``no_decay_parameter_names``) and the before-load door (``patch_model_classes``):
SPEC section 8."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

import vscale_plugin as vsp
from vscale_plugin.hf.classes import _pretrained_base, causal_lm_class, patched_model_classes
from vscale_plugin.hf.registry import REGISTRY
from vscale_plugin.ops import MODES
from vscale_plugin.testing.models import randomise_theta, tiny_config, tiny_model


def _ids(batch=2, t=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _plain_classes():
    # A failing test must not leave transformers patched for the next one.
    yield
    vsp.unpatch_model_classes()


# ---- no_decay_parameter_names ----


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_theta_biases_and_norms_are_never_decayed(model_type):
    model = vsp.apply_vscale(tiny_model(model_type, attention_bias=True))
    names = vsp.no_decay_parameter_names(model)
    params = dict(model.named_parameters())
    assert len(names) == len(set(names)) and set(names) <= set(params)
    thetas = {n for n in params if ".vscale.theta" in n}
    assert len(thetas) == model.config.num_hidden_layers and thetas <= set(names)
    biases = {n for n in params if n.endswith(".bias")}
    norms = {
        f"{m}.{p}"
        for m, module in model.named_modules()
        if "Norm" in type(module).__name__
        for p, _ in module.named_parameters(recurse=False)
    }
    assert norms and biases | norms <= set(names)
    assert biases or model_type not in ("qwen2", "starcoder2")  # families with biases have them in the tiny model
    # Matrices are decayed, embeddings and lm_head included (as Trainer and the paper's recipe do).
    assert set(names) == {n for n, p in params.items() if p.ndim < 2}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


@pytest.mark.parametrize("mode", ["fixed", "backward"])
def test_a_frozen_theta_is_a_buffer_and_not_named(mode):
    model = vsp.apply_vscale(tiny_model("llama"), mode=mode)
    assert not any("vscale" in n for n in vsp.no_decay_parameter_names(model))


def test_a_wrapped_model_gets_the_wrappers_names():
    class Wrapper(nn.Module):  # what DDP and deepspeed.initialize do: the model as submodule "module"
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = vsp.apply_vscale(tiny_model("qwen2"))
    wrapped = Wrapper(model)
    names = vsp.no_decay_parameter_names(wrapped)
    assert names == [f"module.{n}" for n in vsp.no_decay_parameter_names(model)]
    assert set(names) <= {n for n, _ in wrapped.named_parameters()}


def test_decay_parameter_groups_split_the_trainable_parameters():
    model = vsp.apply_vscale(tiny_model("qwen2"))
    model.model.embed_tokens.weight.requires_grad_(False)
    decay, no_decay = vsp.decay_parameter_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert spared == set(vsp.no_decay_parameter_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert spared | {names[id(p)] for p in decay["params"]} == trainable


# ---- transformers.Trainer ----


class SparingTrainer(Trainer):
    # The documented one-line fix for any Trainer subclass (SFTTrainer...).
    def get_decay_parameter_names(self, model):
        return [n for n in super().get_decay_parameter_names(model) if n not in vsp.no_decay_parameter_names(model)]


def _trainer(cls, tmp_path, weight_decay, steps=0):
    model = randomise_theta(vsp.apply_vscale(tiny_model("llama")))  # theta != 0, so that decay would move it
    for name, p in model.named_parameters():
        p.requires_grad_(".vscale." in name)  # theta's gradient then is the same whatever the decay of the rest
    ids = _ids(batch=8, t=16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{cls.__name__}{weight_decay}"),
        weight_decay=weight_decay,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_steps=max(steps, 1),
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = cls(model=model, args=args, train_dataset=data)
    if steps:
        trainer.train()
    return trainer


def _theta_decay(trainer):
    optimizer = trainer.create_optimizer()
    thetas = {id(p) for n, p in trainer.model.named_parameters() if ".vscale." in n}
    return {g["weight_decay"] for g in optimizer.param_groups if thetas & {id(p) for p in g["params"]}}


def _thetas(trainer):
    return torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if ".vscale." in n])


def test_trainer_decays_theta_by_default(tmp_path):
    trainer = _trainer(Trainer, tmp_path, 0.1)
    assert any(".vscale.theta" in n for n in trainer.get_decay_parameter_names(trainer.model))
    assert _theta_decay(trainer) == {0.1}
    decayed, plain = _trainer(Trainer, tmp_path, 0.1, steps=3), _trainer(Trainer, tmp_path, 0.0, steps=3)
    assert not torch.equal(_thetas(decayed), _thetas(plain))


def test_the_one_line_fix_keeps_theta_out_of_weight_decay(tmp_path):
    trainer = _trainer(SparingTrainer, tmp_path, 0.1)
    assert not any(".vscale." in n for n in trainer.get_decay_parameter_names(trainer.model))
    assert _theta_decay(trainer) == {0.0}
    decayed, plain = _trainer(SparingTrainer, tmp_path, 0.1, steps=3), _trainer(SparingTrainer, tmp_path, 0.0, steps=3)
    start = _thetas(_trainer(SparingTrainer, tmp_path, 0.1))
    assert not torch.equal(_thetas(decayed), start)  # theta trained...
    assert torch.equal(_thetas(decayed), _thetas(plain))  # ...exactly as without any weight decay


# ---- patch_model_classes ----


def _class_state():
    classes = {causal_lm_class(t) for t in REGISTRY} | {_pretrained_base(causal_lm_class(t)) for t in REGISTRY}
    return {cls: dict(cls.__dict__) for cls in classes}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for cls, attributes in a.items():
        assert attributes.keys() == b[cls].keys(), cls
        assert all(value is b[cls][k] for k, value in attributes.items()), cls


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_class_and_instance_doors_build_the_same_model(model_type):
    config = tiny_config(model_type)
    torch.manual_seed(0)
    instance = vsp.apply_vscale(AutoModelForCausalLM.from_config(config, attn_implementation="eager")).eval()
    with vsp.patch_model_classes():
        torch.manual_seed(0)
        patched = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert type(patched) is type(instance) and vsp.is_vscaled(patched)
    assert patched.config.vscale == {"mode": "learned", "sigma": 0.02}
    for (name, a), (other, b) in zip(instance.state_dict().items(), patched.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name
    randomise_theta(instance), randomise_theta(patched)
    assert torch.equal(patched(_ids()).logits, instance(_ids()).logits)


@pytest.mark.parametrize("mode", MODES)
def test_a_class_built_directly_is_vscaled_in_the_patched_mode(mode):
    vsp.patch_model_classes(mode=mode, sigma=0.01)
    model = LlamaForCausalLM(tiny_config("llama"))
    assert model.config.vscale == {"mode": mode, "sigma": 0.01}
    assert any(".vscale.theta" in n for n in model.state_dict())


def test_from_pretrained_of_a_plain_checkpoint_initialises_theta(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path)
    expected = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    with vsp.patch_model_classes():
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    thetas = [p for n, p in model.named_parameters() if ".vscale.theta" in n]
    assert len(thetas) == 2 and all(torch.equal(p, torch.zeros(2)) for p in thetas)
    assert bf16.model.layers[0].self_attn.vscale.theta.dtype == torch.bfloat16
    assert torch.equal(bf16.model.layers[0].self_attn.vscale.theta, torch.zeros(2, dtype=torch.bfloat16))
    for (name, a), (_, b) in zip(expected.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(model.eval()(_ids()).logits, expected(_ids()).logits)


@pytest.mark.parametrize("saved_mode", MODES)
def test_from_pretrained_of_a_vscale_checkpoint_loads_its_settings_and_theta(tmp_path, saved_mode):
    source = vsp.apply_vscale(tiny_model("llama"), mode=saved_mode, sigma=0.03)
    randomise_theta(source)  # learned mode only; frozen theta stays 0
    source.save_pretrained(tmp_path)
    with vsp.patch_model_classes(mode="learned"):
        plain_door, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        our_door = vsp.from_pretrained(tmp_path)
    for model in (plain_door, our_door):
        assert type(model) is type(source)
        assert model.config.vscale == {"mode": saved_mode, "sigma": 0.03}
        for (name, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_checkpoint_lacking_the_theta_its_config_declares_is_still_reported(tmp_path):
    model = tiny_model("llama")
    model.config.vscale = {"mode": "learned", "sigma": 0.02}
    model.save_pretrained(tmp_path)
    with vsp.patch_model_classes():
        _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        with pytest.raises(ValueError, match="lack"):
            vsp.from_pretrained(tmp_path)
    assert {f"model.layers.{i}.self_attn.vscale.theta" for i in range(2)} <= set(info["missing_keys"])


def test_unpatch_restores_every_class_exactly_and_later_models_are_plain(tmp_path):
    before = _class_state()
    ids = _ids()
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    vsp.patch_model_classes()
    assert patched_model_classes() == {"mode": "learned", "sigma": 0.02, "model_types": sorted(REGISTRY)}
    torch.manual_seed(0)
    built = randomise_theta(AutoModelForCausalLM.from_config(tiny_config("llama"))).eval()
    vsp.unpatch_model_classes()
    _assert_same_state(_class_state(), before)
    assert patched_model_classes() is None
    vsp.unpatch_model_classes()  # a no-op when nothing is patched
    assert not vsp.is_vscaled(AutoModelForCausalLM.from_config(tiny_config("llama")))
    assert not vsp.is_vscaled(LlamaForCausalLM(tiny_config("llama")))
    tiny_model("llama").save_pretrained(tmp_path)
    assert not vsp.is_vscaled(AutoModelForCausalLM.from_pretrained(tmp_path))
    # A model built while patched stays V-scaled, saves and loads like any other, and removes to the plain model.
    assert vsp.is_vscaled(built)
    built.save_pretrained(tmp_path / "vscaled")
    loaded = vsp.from_pretrained(tmp_path / "vscaled").eval()
    assert torch.equal(loaded(ids).logits, built(ids).logits)
    assert torch.equal(vsp.remove_vscale(built)(ids).logits, plain(ids).logits)
    assert built.config.vscale is None and list(built.state_dict()) == list(plain.state_dict())


def test_the_context_manager_unpatches_on_leaving_even_after_an_error():
    before = _class_state()
    with pytest.raises(RuntimeError, match="inside"), vsp.patch_model_classes(mode="fixed") as patch:
        assert (patch.mode, patch.sigma, patch.model_types) == ("fixed", 0.02, tuple(sorted(REGISTRY)))
        assert vsp.is_vscaled(tiny_model("gemma2"))
        raise RuntimeError("inside")
    _assert_same_state(_class_state(), before)
    assert not vsp.is_vscaled(tiny_model("gemma2"))


def test_patching_is_idempotent_and_other_settings_are_an_error():
    vsp.patch_model_classes(model_types=["llama"])
    state = _class_state()
    with vsp.patch_model_classes(model_types=("llama",)):  # the same patch: changes nothing, undoes nothing
        _assert_same_state(_class_state(), state)
    _assert_same_state(_class_state(), state)
    model = tiny_model("llama")
    assert len(model.model.layers[0].self_attn.v_proj._forward_hooks) == 1
    for kwargs in ({"mode": "fixed", "model_types": ["llama"]}, {"sigma": 0.01, "model_types": ["llama"]}, {}):
        with pytest.raises(ValueError, match="unpatch_model_classes"):
            vsp.patch_model_classes(**kwargs)
    _assert_same_state(_class_state(), state)


def test_only_the_named_model_types_are_patched():
    with vsp.patch_model_classes(model_types=["mistral"]):
        assert vsp.is_vscaled(tiny_model("mistral"))
        assert not vsp.is_vscaled(tiny_model("llama"))


def test_unknown_settings_are_errors_naming_what_is_supported():
    with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
        vsp.patch_model_classes(model_types=["llama", "gpt2"])
    with pytest.raises(ValueError, match="learned, fixed, backward"):
        vsp.patch_model_classes(mode="adaptive")
    with pytest.raises(ValueError, match="sigma"):
        vsp.patch_model_classes(sigma=0)
    assert patched_model_classes() is None


# ---- ZeRO-3 on 2 ranks ----


@pytest.fixture(scope="module")
def zero3_ranks(tmp_path_factory):
    from vscale_plugin.testing.distributed import run_worker_ranks

    worker = Path(__file__).parent / "workers" / "zero3_classes.py"
    return run_worker_ranks(worker, tmp_path_factory.mktemp("zero3_classes"), num_gpus=2, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("door", ["from_config", "from_plain", "from_vscaled"])
def test_zero3_builds_theta_inside_zero_init_partitioned(zero3_ranks, door):
    for res in zero3_ranks:
        seen = res[door]
        assert seen["vscaled"] and seen["config_vscale"] == {"mode": "learned", "sigma": 0.02}
        assert len(seen["theta_info"]) == 2
        for info in seen["theta_info"]:
            # partitioned by zero.Init: each rank holds one of the two entries, none is gathered
            assert info == {"has_ds_id": True, "local_numel": 1, "data_numel": 0}
        expected = res["saved_theta"] if door == "from_vscaled" else [[0.0, 0.0]] * 2
        assert seen["theta"] == expected
    assert all(any(v != 0 for v in theta) for theta in zero3_ranks[0]["saved_theta"])


@pytest.mark.distributed
def test_zero3_loads_the_plain_checkpoint_and_trains_theta(zero3_ranks):
    for res in zero3_ranks:
        assert res["plain_weights_equal"]
        assert res["no_decay"] == res["expected_no_decay"]
        assert res["all_finite"]
        assert all(v != 0 for theta in res["theta_after_training"] for v in theta)
        assert res["losses"][-1] < res["losses"][0]
    assert zero3_ranks[0]["theta_after_training"] == zero3_ranks[1]["theta_after_training"]
