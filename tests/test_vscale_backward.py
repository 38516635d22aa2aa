"""V-scale mode "backward", the paper's backward-only ablation (SPEC section 1): the forward pass is the baseline's bit
for bit, the backward pass has V-scale's Jacobian; through the HF patch, the statistics, the launcher, the study and
the comparison report. The op-level math is in test_ops_vscale.py."""

import pytest
import torch
from mlflow import MlflowClient

import vscale_plugin as vsp
from vscale_plugin.apps import study
from vscale_plugin.apps.compare.report import directions, format_table
from vscale_plugin.apps.compare.runs import RunData, _mode_order
from vscale_plugin.hf.registry import attention_layers
from vscale_plugin.launch.cli import UsageError
from vscale_plugin.launch.ds_config import CONFIG_DIR
from vscale_plugin.testing.models import tiny_model
from vscale_plugin.train import cli
from vscale_plugin.train.mlflow_run import open_run

torch.backends.cuda.matmul.allow_tf32 = False

# Integer views of each float dtype: equal views mean equal bits.
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _ids(batch=2, t=12, seed=1):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


def _backward(attn="eager", **overrides):
    return vsp.apply_vscale(tiny_model("llama", attn_implementation=attn, **overrides), mode="backward")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_baselines_bit_for_bit(dtype, attn):
    ids = _ids()
    with torch.no_grad():
        baseline = tiny_model("llama", attn_implementation=attn).to(dtype)(ids).logits
        patched = _backward(attn).to(dtype)(ids).logits
        fixed = vsp.apply_vscale(tiny_model("llama", attn_implementation=attn), mode="fixed").to(dtype)(ids).logits
    assert torch.equal(patched, baseline)
    assert torch.equal(patched.view(_BITS[dtype]), baseline.view(_BITS[dtype]))
    assert not torch.equal(fixed, baseline)  # the same weights with V-scale's forward do differ


def test_generation_with_kv_cache_is_the_baselines():
    prompt = _ids(batch=1, t=5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    with torch.no_grad():
        out = _backward()(prompt, use_cache=True)
        plain = tiny_model("llama")(prompt, use_cache=True)
    for layer in range(2):
        a, b = out.past_key_values.layers[layer], plain.past_key_values.layers[layer]
        assert torch.equal(a.values, b.values) and torch.equal(a.keys, b.keys)
    assert torch.equal(_backward().generate(prompt, **kwargs), tiny_model("llama").generate(prompt, **kwargs))


def _formula_hook(kv_heads, head_dim, c):
    """v_proj forward hook written here from SPEC 1, independent of vscale_plugin, in the output's dtype (float64):
    v_hat = sg(v) + (phi*v - sg(phi*v)), phi = r / (r + C), r = ||v||^2 per KV head."""

    def hook(module, args, output):
        v = output.unflatten(-1, (kv_heads, head_dim))
        r = (v * v).sum(-1, keepdim=True)
        scaled = v * (r / (r + c))
        return (v.detach() + (scaled - scaled.detach())).flatten(-2)

    return hook


def _grads(model, ids):
    """Logits, every parameter gradient and the gradient of the input embeddings of the causal-LM loss."""
    model.zero_grad(set_to_none=True)
    embeds = []

    def keep(module, args, output):
        output.retain_grad()
        embeds.append(output)

    handle = model.model.embed_tokens.register_forward_hook(keep)
    try:
        out = model(ids, labels=ids)
    finally:
        handle.remove()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), {**grads, "inputs_embeds": embeds[0].grad}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_every_gradient_matches_float64_autograd_of_the_formula(attn, kv_heads):
    ids = _ids()
    model = _backward(attn, num_key_value_heads=kv_heads)
    logits, grads = _grads(model, ids)

    twin = tiny_model("llama", attn_implementation=attn, num_key_value_heads=kv_heads).double()
    c = 32 * 8 * 0.02**2  # C = d_model * d_head * sigma^2 with theta = 0 (lambda = 1)
    for layer in twin.model.layers:
        layer.self_attn.v_proj.register_forward_hook(_formula_hook(kv_heads, 8, c))
    ref_logits, ref_grads = _grads(twin, ids)

    assert set(grads) == set(ref_grads) == {n for n, _ in twin.named_parameters()} | {"inputs_embeds"}
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=2e-5, atol=2e-5 * scale, msg=name)

    plain = tiny_model("llama", attn_implementation=attn, num_key_value_heads=kv_heads)
    _, baseline = _grads(plain, ids)
    for name in ("inputs_embeds", "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert (grads[name] - baseline[name]).abs().max() > 1e-3 * baseline[name].abs().max(), name  # the valve acts
    # Only the value path changes: the last layer's MLP and the head see the baseline's activations and gradients.
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(grads[name], baseline[name]), name


def test_theta_is_a_zero_buffer_and_gets_no_gradient():
    model = _backward()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny_model("llama").named_parameters()]
    for attn in attention_layers(model):
        assert dict(attn.vscale.named_buffers()) == {"theta": attn.vscale.theta}
        assert torch.equal(attn.vscale.theta, torch.zeros(2)) and not attn.vscale.theta.requires_grad
        assert attn.vscale.mode == "backward" and "mode=backward" in repr(attn.vscale)
    model(_ids(), labels=_ids()).loss.backward()
    assert all(attn.vscale.theta.grad is None for attn in attention_layers(model))


def test_save_and_from_pretrained_restore_the_mode_and_its_gradients(tmp_path):
    model = _backward()
    ids = _ids()
    logits, grads = _grads(model, ids)
    model.save_pretrained(tmp_path)
    loaded = vsp.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.vscale == {"mode": "backward", "sigma": 0.02}
    assert {attn.vscale.mode for attn in attention_layers(loaded)} == {"backward"}
    loaded_logits, loaded_grads = _grads(loaded, ids)
    assert torch.equal(loaded_logits, logits)
    assert all(torch.equal(loaded_grads[n], g) for n, g in grads.items())
    vsp.remove_vscale(loaded)
    assert loaded.config.vscale is None and not vsp.is_vscaled(loaded)


def test_measure_reports_the_valves_phi_and_the_baselines_forward_statistics():
    ids = _ids(t=70)
    backward = vsp.measure(_backward(), ids)
    baseline = vsp.measure(tiny_model("llama"), ids)
    fixed = vsp.measure(vsp.apply_vscale(tiny_model("llama"), mode="fixed"), ids)
    assert set(backward) == set(fixed)
    phis = {k: v for k, v in backward.items() if k.startswith("vscale/phi/")}
    assert set(phis) == {f"vscale/phi/{pos}/L{i:02d}" for pos in ("tok0", "rest") for i in range(2)}
    assert all(0 < v < 1 for v in phis.values())
    assert all(v == 1.0 for k, v in backward.items() if k.startswith("vscale/lambda/"))
    # Layer 0 sees the same v in both modes, so the same phi; in backward mode phi scales gradients only.
    assert backward["vscale/phi/rest/L00"] == fixed["vscale/phi/rest/L00"]
    forward_keys = [k for k in baseline if k.startswith(("as/", "ma/"))]
    assert forward_keys and all(backward[k] == baseline[k] for k in forward_keys)
    assert backward["gs/ratio/median"] != baseline["gs/ratio/median"]


def _launcher_args(tmp_path, *flags):
    return cli.parse_args(["--ds_config", str(CONFIG_DIR / "zero2.json"), "--save_dir", str(tmp_path / "run"), *flags])


def test_launcher_accepts_vscale_backward_and_mlflow_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = cli.build_config(_launcher_args(tmp_path, "--vscale", "backward", "--experiment", "ablation"), 1)
    assert config.vscale == "backward" and "-backward-" in config.run_name
    logger = open_run(config, _backward(), None)
    logger.close()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ablation").experiment_id])
    assert run.data.tags["vscale"] == "backward" and run.data.params["vscale"] == "backward"


def test_launcher_refuses_an_unknown_mode_naming_backward(tmp_path, capsys):
    with pytest.raises((SystemExit, UsageError)) as err:
        _launcher_args(tmp_path, "--vscale", "backwards")
    message = str(err.value) + capsys.readouterr().err
    assert "backwards" in message and "backward" in message.replace("backwards", "")


def test_study_accepts_backward_among_its_modes():
    args, extra = study.parse_args(["--preset", "smoke", "--modes", "off,learned,backward"])
    assert args.modes == ["off", "learned", "backward"]
    command = study.pretrain_command(args, "backward", extra)
    assert command[command.index("--vscale") + 1] == "backward"
    assert command[command.index("--run_name") + 1].endswith("-backward")
    with pytest.raises(UsageError, match="learned, fixed, backward"):
        study.parse_args(["--modes", "off,backwards"])


def _run(mode, tok0_max):
    latest = {"train/loss": 3.0, "eval/loss": 3.1, "ma/h_out/tok0/max": tok0_max, "as/sink_rate/mean": 0.5}
    latest |= {"as/sink_rate/L00": 0.5, "ma/h_out/tok0/L00": tok0_max, "ma/h_out/rest/L00": 1.0}
    return RunData(run_id=f"id-{mode}", name=f"smoke-{mode}", mode=mode, status="FINISHED", latest=latest)


def test_compare_report_gives_a_backward_run_its_own_rows_after_learned():
    runs = sorted([_run("backward", 40.0), _run("learned", 5.0), _run("off", 50.0)], key=lambda r: _mode_order(r.mode))
    assert [r.mode for r in runs] == ["off", "learned", "backward"]
    assert sorted(["backward", "zzz", "fixed"], key=_mode_order) == ["fixed", "backward", "zzz"]
    table = format_table(runs, runs[0])
    rows = [line.split(" | ")[2] for line in table.splitlines()[2:]]
    assert rows == ["off", "learned", "backward", "learned / off", "backward / off"]
    assert runs[2].label == "backward: smoke-backward"
    lines = directions(runs, runs[0])
    assert any(line.startswith("- backward: token-0 massive activations suppressed") for line in lines)
    assert any(line.startswith("- backward: ") and line.endswith("does not hold") for line in lines)  # 40/50 = 0.8
