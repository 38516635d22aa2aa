"""V-scale checkpoints load V-scaled in plain transformers (issue 14, item 5b): ``save_pretrained`` writes
``modeling_vscale.py`` and ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)`` and
lm-eval's ``--model hf`` build the same model ``vsp.from_pretrained(d)`` does, without vscale_plugin installed."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import vscale_plugin as vsp
from vscale_plugin.hf import remote_code
from vscale_plugin.hf.registry import REGISTRY
from vscale_plugin.ops import MODES, VScale
from vscale_plugin.testing.models import randomise_theta, tiny_model

ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma2"]  # gemma2: sandwich norms, soft-capping, another base class


def _ids(batch=2, t=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def _save_vscaled(directory: Path, model_type="llama", mode="learned", **overrides) -> Path:
    model = vsp.apply_vscale(tiny_model(model_type, **overrides), mode=mode)
    if mode == "learned":
        randomise_theta(model)
    model.save_pretrained(directory)
    return directory


def _remote_load(directory: Path):
    model, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    # The dynamic-module cache of transformers in tmp_path: nothing is left in the user's ~/.cache.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}  # fmt: skip


# Refuses vscale_plugin, then checks that it really cannot be imported, before the script proper.
_WITHOUT_PLUGIN = """import sys
sys.modules["vscale_plugin"] = None
try:
    import vscale_plugin
except ImportError:
    pass
else:
    raise SystemExit("vscale_plugin is importable")
"""


def _rendered_module(tmp_path: Path, model_type="llama"):
    path = tmp_path / f"modeling_vscale_{model_type}.py"
    path.write_text(remote_code.render(tiny_model(model_type)))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extreme_values(dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, 2, 8, generator=g)
    v[0, 0] = 0.0  # zero vectors: phi = 0
    v[0, 1, 0] = 1e-20  # r below float32's tiny
    v[0, 2, 1] = 3e19  # ||v||^2 overflows float32: r clamped, phi = 1
    v[1] *= 1e4
    v[2] *= 1e-3
    if dtype == torch.bfloat16:
        v[0, 3] = torch.finfo(torch.bfloat16).max / 8
    return v.flatten(-2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_rendered_vscale_equals_ops_vscale_values_and_gradients(tmp_path, mode, dtype):
    remote = _rendered_module(tmp_path).VScale(2, 8, 32, mode, 0.02, dtype=dtype)
    ours = VScale(2, 8, 32, mode=mode, sigma=0.02, dtype=dtype)
    if mode == "learned":
        with torch.no_grad():
            for module in (remote, ours):
                module.theta.copy_(torch.tensor([-2.5, 1.7]))
    assert remote.state_dict().keys() == ours.state_dict().keys()
    assert isinstance(remote.theta, torch.nn.Parameter) == (mode == "learned")
    base = _extreme_values(dtype)
    upstream = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for module in (remote, ours):
        v = base.clone().requires_grad_()
        out = module(v)
        out.backward(upstream)
        theta_grad = module.theta.grad if mode == "learned" else None
        results.append((out.detach(), v.grad, theta_grad))
    (out_r, grad_r, theta_r), (out_o, grad_o, theta_o) = results
    torch.testing.assert_close(out_r, out_o, rtol=0, atol=0)
    torch.testing.assert_close(grad_r, grad_o, rtol=0, atol=0)
    assert torch.isfinite(out_r.float()).all() and torch.isfinite(grad_r.float()).all()
    if mode == "learned":
        torch.testing.assert_close(theta_r, theta_o, rtol=0, atol=0)
        assert theta_r.abs().min() > 0
    if mode == "backward":
        assert torch.equal(out_r, base)


def test_rendered_file_imports_only_torch_and_transformers():
    for model_type in ARCHITECTURES:
        tree = ast.parse(remote_code.render(tiny_model(model_type)))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}  # fmt: skip
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported == {"__future__", "torch", "transformers"}, model_type


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_trust_remote_code_load_equals_vsp_from_pretrained(tmp_path, model_type, mode):
    d = _save_vscaled(tmp_path / f"{model_type}_{mode}", model_type, mode)
    config = json.loads((d / "config.json").read_text())
    name = remote_code.remote_class_name(tiny_model(model_type))
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_vscale.{name}"}
    assert config["vscale"] == {"mode": mode, "sigma": 0.02}
    remote = _remote_load(d)
    loaded = vsp.from_pretrained(d).eval()
    assert type(remote).__name__ == name and isinstance(remote, type(loaded))
    assert remote.state_dict().keys() == loaded.state_dict().keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, loaded(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", sorted(set(REGISTRY) - set(ARCHITECTURES)))
def test_every_registry_architecture_loads_with_trust_remote_code(tmp_path, model_type):
    d = _save_vscaled(tmp_path / model_type, model_type)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            _remote_load(d)(ids).logits, vsp.from_pretrained(d).eval()(ids).logits, rtol=0, atol=0
        )


def test_theta_trains_in_the_remote_model(tmp_path):
    remote = _remote_load(_save_vscaled(tmp_path / "learned")).train()
    thetas = {n: p for n, p in remote.named_parameters() if "vscale" in n}
    assert sorted(thetas) == [f"model.layers.{i}.self_attn.vscale.theta" for i in range(2)]
    ids = _ids()
    remote(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().min() > 0 for p in thetas.values())
    fixed = _remote_load(_save_vscaled(tmp_path / "fixed", mode="fixed"))
    assert not [n for n, _ in fixed.named_parameters() if "vscale" in n]
    assert len([n for n, _ in fixed.named_buffers() if "vscale" in n]) == 2


def test_a_value_projection_replaced_after_loading_is_an_error_not_a_model_without_vscale(tmp_path):
    # What DeepSpeed AutoTP does to v_proj in deepspeed.initialize; this file's V-scale does not follow it.
    remote = _remote_load(_save_vscaled(tmp_path / "d"))
    attention = remote.model.layers[1].self_attn
    replacement = torch.nn.Linear(32, 16, bias=False)
    replacement.load_state_dict(attention.v_proj.state_dict())
    attention.v_proj = replacement
    with pytest.raises(
        RuntimeError, match=r"LlamaAttention\.v_proj was replaced after loading.*vscale_plugin\.from_pretrained"
    ):
        remote(_ids())


def test_remote_model_saved_again_loads_both_ways(tmp_path):
    d = _save_vscaled(tmp_path / "first", "qwen2")
    again = tmp_path / "again"
    _remote_load(d).save_pretrained(again)
    assert (again / "modeling_vscale.py").read_text() == (d / "modeling_vscale.py").read_text()
    ids = _ids()
    with torch.no_grad():
        expected = vsp.from_pretrained(d).eval()(ids).logits
        torch.testing.assert_close(vsp.from_pretrained(again).eval()(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(_remote_load(again)(ids).logits, expected, rtol=0, atol=0)


_LOAD_WITHOUT_PLUGIN = (
    _WITHOUT_PLUGIN
    + """import json
import torch
from transformers import AutoModelForCausalLM

job = json.loads(sys.argv[1])
ids = torch.load(job["ids"])
out = {}
for d in job["dirs"]:
    model, info = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.abs().min().item() for n, p in model.named_parameters() if "vscale" in n}
    with torch.no_grad():
        out[d] = {"logits": model.eval()(ids).logits, "theta_grads": grads}
    model.save_pretrained(d + "_resaved")
torch.save(out, job["out"])
"""
)


def test_loads_where_vscale_plugin_cannot_be_imported(tmp_path):
    dirs = {mode: _save_vscaled(tmp_path / f"{t}_{mode}", t, mode) for t, mode in
            [("llama", "learned"), ("mistral", "fixed"), ("qwen2", "backward")]}  # fmt: skip
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    job = {"dirs": [str(d) for d in dirs.values()], "ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / "out.pt")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_PLUGIN, json.dumps(job)], cwd=tmp_path,
                          env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for mode, d in dirs.items():
        with torch.no_grad():
            expected = vsp.from_pretrained(d).eval()(ids).logits
            resaved = vsp.from_pretrained(f"{d}_resaved").eval()(ids).logits
        torch.testing.assert_close(out[str(d)]["logits"], expected, rtol=0, atol=0)
        torch.testing.assert_close(resaved, expected, rtol=0, atol=0)
        grads = out[str(d)]["theta_grads"]
        assert (len(grads) == 2 and min(grads.values()) > 0) if mode == "learned" else not grads


def test_remove_vscale_saves_a_plain_checkpoint(tmp_path):
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    model = vsp.apply_vscale(tiny_model("llama"))
    model.save_pretrained(tmp_path / "vscaled")
    assert "auto_map" not in vars(model.config)  # the config in memory is left as it was
    vsp.remove_vscale(model)
    model.save_pretrained(tmp_path / "removed")
    for name in ("plain", "removed"):
        assert "auto_map" not in json.loads((tmp_path / name / "config.json").read_text())
        assert not (tmp_path / name / "modeling_vscale.py").exists()
    assert "save_pretrained" not in vars(model)


def test_a_deep_copy_saves_its_own_theta(tmp_path):
    model = randomise_theta(vsp.apply_vscale(tiny_model("llama")))
    clone = randomise_theta(copy.deepcopy(model), seed=5)
    clone.save_pretrained(tmp_path)
    theta = "model.layers.0.self_attn.vscale.theta"
    assert torch.equal(_remote_load(tmp_path).state_dict()[theta], clone.state_dict()[theta])
    assert not torch.equal(clone.state_dict()[theta], model.state_dict()[theta])


def test_apply_vscale_refuses_a_remote_code_model(tmp_path):
    remote = _remote_load(_save_vscaled(tmp_path))
    with pytest.raises(ValueError, match=r"vscale_plugin\.from_pretrained"):
        vsp.apply_vscale(remote)


def _word_tokenizer(directory: Path):
    """A word-level tokenizer over the local task's words, saved to ``directory``: what HFLM loads beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vscale_plugin.evaluate import harness

    docs = [json.loads(line) for line in (harness.LOCAL_TASKS_DIR / f"{harness.LOCAL_TASK}.jsonl").open()]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([" ".join([d["question"], *d["choices"]]) for d in docs],
                              trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.save_pretrained(directory)
    return tokenizer


_LM_EVAL_WITHOUT_PLUGIN = _WITHOUT_PLUGIN + "from lm_eval.__main__ import cli_evaluate\ncli_evaluate()\n"


def _samples(output_path: Path, task: str) -> list[float]:
    (path,) = output_path.rglob(f"samples_{task}_*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # lm-eval writes each (loglikelihood, is_greedy) response as strings
    return [float(resp[0]) for s in sorted(lines, key=lambda s: s["doc_id"]) for resp in s["filtered_resps"]]


@pytest.mark.slow
def test_lm_eval_cli_evaluates_the_vscaled_model_without_vscale_plugin(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra")
    from vscale_plugin.evaluate import harness

    d = tmp_path / "vscaled"
    tokenizer = _word_tokenizer(d)
    model = randomise_theta(vsp.apply_vscale(tiny_model("llama", vocab_size=len(tokenizer), seed=3)))
    model.save_pretrained(d)
    tasks = harness.local_tasks(tmp_path / "tasks")
    out = tmp_path / "lm_eval_out"
    args = ["--model", "hf", "--model_args", f"pretrained={d},trust_remote_code=True", "--tasks", harness.LOCAL_TASK,
            "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu", "--output_path", str(out),
            "--log_samples"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _LM_EVAL_WITHOUT_PLUGIN, *args], cwd=tmp_path,
                          env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    cli_acc = json.loads(results_file.read_text())["results"][harness.LOCAL_TASK]["acc,none"]
    cli = _samples(out, harness.LOCAL_TASK)
    assert len(cli) == 4 * 32

    def in_process(model):
        results = harness.harness_results(model, tokenizer, [harness.LOCAL_TASK], batch_size=4, log_samples=True)
        samples = sorted(results["samples"][harness.LOCAL_TASK], key=lambda s: s["doc_id"])
        logliks = [resp[0] for s in samples for resp in s["filtered_resps"]]
        return logliks, results["results"][harness.LOCAL_TASK]["acc,none"]

    loaded = vsp.from_pretrained(d).eval()
    expected, expected_acc = in_process(loaded)
    assert cli == pytest.approx(expected, abs=1e-5) and cli_acc == expected_acc
    without, _ = in_process(vsp.remove_vscale(loaded))
    assert sum(abs(a - b) > 1e-3 for a, b in zip(cli, without, strict=True)) > len(cli) // 2, "not the V-scaled model"
