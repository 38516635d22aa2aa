"""GradientSinkCallback inside a real transformers Trainer: the values equal vsp.measure on each due step's global
batch, they reach transformers' own MLflowCallback at the due steps only, theta is never decayed, and misuse is one
clear error. examples/hf_trainer.py runs here, in one process and on 2 DeepSpeed ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import vscale_plugin as vsp
from vscale_plugin.integrations.transformers import GradientSinkCallback
from vscale_plugin.testing.distributed import run_deepspeed
from vscale_plugin.testing.models import tiny_config
from vscale_plugin.testing.tokenizers import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import accelerate_loop  # noqa: E402
import hf_trainer  # noqa: E402

# Whole-tensor qr/ statistics are per forward call (one micro-batch), averaged over the step: not a global-batch value.
PER_CALL = ("qr/max_over_median/", "qr/int8_error/")
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    texts = [json.loads(line)["text"] for line in (ROOT / "tests/data/c4-sample.jsonl").open()][:120]
    tokenizer = train_tokenizer(texts, d, vocab_size=384)
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    with (d / "data.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:60])
    return d


def example_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(model_dir / "data.jsonl"), "--output_dir", str(out),
            "--every", "2", "--max_steps", "4", "--grad_accum", "2", "--batch_size", "2", "--seq_len", "48",
            "--logging_steps", "1", *extra]  # fmt: skip


class Recorder(TrainerCallback):
    """The weights before each step and every micro-batch it trains on (an independent record of the step)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}
        self.batches: dict[int, list] = {}
        self.hooks: dict[int, int] = {}
        self.step = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step + 1
        self.weights[self.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.batches[self.step] = []
        self.hooks[self.step] = hook_count(model)  # after GradientSinkCallback.on_step_begin (it runs first)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def recorded_trainer(argv: list[str], recorder: Recorder, example=hf_trainer):
    trainer = example.build_trainer(example.parse_args(argv), callbacks=[recorder])
    step = trainer.training_step

    def training_step(model, inputs, *rest, **kwargs):
        recorder.batches[recorder.step].append(inputs["input_ids"].detach().clone())
        return step(model, inputs, *rest, **kwargs)

    trainer.training_step = training_step
    return trainer


def measured(model_dir: Path, weights: dict, batches: list, mode: str = "learned") -> dict[str, float]:
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), mode=mode)
    model.load_state_dict(weights)
    return vsp.measure(model, torch.cat(batches))


def assert_close_to(logged: dict, reference: dict, rtol: float = 1e-4) -> None:
    assert set(reference) <= set(logged), sorted(set(reference) - set(logged))[:5]
    for key, value in reference.items():
        if not key.startswith(PER_CALL):
            assert logged[key] == pytest.approx(value, rel=rtol, abs=1e-7), key


def test_trainer_logs_equal_measure_at_due_steps_only(model_dir, tmp_path, monkeypatch):
    # max_grad_norm far below the gradient norm: the Trainer clips, and the callback must have read them before.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trainer-callback")
    recorder = Recorder()
    trainer = recorded_trainer(example_args(model_dir, tmp_path / "out"), recorder)
    trainer.args.max_grad_norm = 1e-3
    trainer.train()

    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for step in (2, 4):
        assert len(recorder.batches[step]) == 2  # accumulation 2
        assert_close_to(logs[step], measured(model_dir, recorder.weights[step], recorder.batches[step]))
    for step in (1, 3):
        assert set(logs[step]) <= TRAINER_KEYS  # nothing measured on steps that are not due
        assert recorder.hooks[step] == recorder.hooks[1]  # and no hook installed
    assert recorder.hooks[2] > recorder.hooks[1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("trainer-callback").experiment_id])
    for key in ("gs/ratio/L00", "as/sink_rate/mean", "grad/vscale/L01", "vscale/lambda/L00/H1", "ma/h_out/tok0/max"):
        steps = {m.step for m in client.get_metric_history(run.info.run_id, key)}
        assert steps == {2, 4}, key
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {1, 2, 3, 4}


def test_gradient_checkpointing_gives_the_same_statistics(model_dir, tmp_path):
    results = []
    for extra in ((), ("--gradient_checkpointing",)):
        trainer = hf_trainer.build_trainer(
            hf_trainer.parse_args(example_args(model_dir, tmp_path / "out", "--report_to", "none", *extra))
        )
        trainer.train()
        results.append(next(e for e in trainer.state.log_history if e.get("step") == 2 and "loss" in e))
    plain, checkpointed = results
    reference = {k: v for k, v in plain.items() if k not in TRAINER_KEYS}
    assert len(reference) > 100
    assert_close_to(checkpointed, reference, rtol=1e-5)


def test_theta_trains_and_is_not_decayed(model_dir, tmp_path):
    trainer = hf_trainer.build_trainer(
        hf_trainer.parse_args(example_args(model_dir, tmp_path / "o", "--report_to", "none"))
    )
    names = trainer.get_decay_parameter_names(trainer.model)
    assert not [n for n in names if ".vscale." in n]
    assert any(n.endswith("q_proj.weight") for n in names)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".vscale." in n}
    trainer.train()
    groups = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        if ".vscale." in name:
            assert groups[id(p)] == 0.0
            assert not torch.equal(p.detach(), before[name])  # it trains


def test_every_below_one_is_refused():
    for every in (0, -3, 1.5):
        with pytest.raises(ValueError, match="every"):
            GradientSinkCallback(every=every)
    with pytest.raises(ValueError, match=r"console='layers'.*summary, all"):
        GradientSinkCallback(console="layers")


@pytest.mark.parametrize("console", ["summary", "all"])
def test_console_shows_the_summaries_and_the_logs_keep_every_key(model_dir, tmp_path, capsys, console):
    trainer = hf_trainer.build_trainer(
        hf_trainer.parse_args(example_args(model_dir, tmp_path, "--report_to", "none", "--max_steps", "2"))
    )
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradientSinkCallback)]
    callback.console = console
    printers = [cb for cb in trainer.callback_handler.callbacks if "on_log" in vars(cb)]
    capsys.readouterr()
    trainer.train()
    printed = capsys.readouterr().out
    assert "'gs/ratio/median'" in printed and "'as/sink_rate/mean'" in printed and "'loss'" in printed
    assert ("'gs/ratio/L01'" in printed) == ("'vscale/lambda/L00/H1'" in printed) == (console == "all")
    (logged,) = [e for e in trainer.state.log_history if e.get("step") == 2 and "loss" in e]
    assert {"gs/ratio/L01", "vscale/lambda/L00/H1", "gs/ratio/median"} <= set(logged)  # the logs keep every key
    assert [cb for cb in trainer.callback_handler.callbacks if "on_log" in vars(cb)] == printers  # undone at the end


def test_model_without_the_layers_is_refused_when_the_trainer_is_built(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

    model = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="GradientSinkCallback: cannot measure BertForMaskedLM"):
        Trainer(model=model, args=args, callbacks=[GradientSinkCallback(every=2)])


def test_vscale_applied_after_the_optimizer_is_refused(model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vsp.apply_vscale(model)  # too late: theta is not in the optimizer
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    dataset = [{"input_ids": torch.arange(16), "labels": torch.arange(16)}] * 4
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None),
                      callbacks=[GradientSinkCallback(every=1)])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"applied after the optimizer was built.*apply_vscale"):
        trainer.train()


def test_callback_outside_a_trainer_says_what_to_use():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = GradientSinkCallback(every=1)
    with pytest.raises(RuntimeError, match="start\\(step\\) / stop\\(\\)"):
        callback.on_train_begin(TrainingArguments(output_dir="/tmp/x", report_to=[]), TrainerState(), TrainerControl())


def test_start_stop_equals_capture_and_measure(model_dir):
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    collector = vsp.StatsCollector(model, every=2)
    hooks = hook_count(model)
    assert collector.start(1) is False and not collector.active and collector.stop() == {}
    assert collector.start(2) is True and collector.active
    with pytest.raises(RuntimeError, match="still being captured"):
        collector.start(3)
    for half in ids.chunk(2):
        (model(input_ids=half, labels=half).loss / 2).backward()
    got = collector.stop()
    assert not collector.active and hook_count(model) == hooks
    reference = vsp.measure(model, ids)
    assert_close_to(got, reference)


def test_loop_that_calls_the_backbone_itself_equals_measure(model_dir):
    # Chunked-loss loops (Liger-Kernel's fused linear cross-entropy, TRL's fused LM head) run model.model and apply
    # the head themselves: the causal-LM wrapper's forward never runs, yet each micro-batch must count.
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    collector = vsp.StatsCollector(model, every=1)
    collector.start(1)
    for half in ids.chunk(2):
        logits = model.lm_head(model.model(input_ids=half).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), half[:, 1:].flatten())
        (loss / 2).backward()
    assert_close_to(collector.stop(), vsp.measure(model, ids))


TRL_KEYS = TRAINER_KEYS | {"entropy", "mean_token_accuracy", "num_tokens"}


def test_trl_sft_trainer_builds_vscale_from_a_name_and_logs_measure_at_due_steps(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'vscale-plugin[trl]'")
    import trl_sft

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "trl-sft")
    recorder = Recorder()
    argv = example_args(model_dir, tmp_path / "out", "--precision", "fp32")
    trainer = recorded_trainer(argv, recorder, example=trl_sft)
    assert vsp.is_vscaled(trainer.model)  # SFTTrainer built it from the name, through patch_model_classes
    assert not vsp.is_vscaled(AutoModelForCausalLM.from_pretrained(model_dir))  # and the classes are restored
    theta = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".vscale." in n}
    trainer.train()

    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    for step in (2, 4):
        assert len(recorder.batches[step]) == 2
        assert_close_to(logs[step], measured(model_dir, recorder.weights[step], recorder.batches[step]))
    assert set(logs[1]) <= TRL_KEYS and set(logs[3]) <= TRL_KEYS
    groups = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        if ".vscale." in name:
            assert groups[id(p)] == 0.0 and not torch.equal(p.detach(), theta[name])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("trl-sft").experiment_id])
    for key in ("gs/ratio/L01", "as/mass/L00", "vscale/lambda/L01/H0"):
        assert {m.step for m in client.get_metric_history(run.info.run_id, key)} == {2, 4}, key


@pytest.mark.parametrize("example", ["hf_trainer", "trl_sft"])
def test_example_main_saves_a_vscale_checkpoint(model_dir, tmp_path, example):
    if example == "trl_sft":
        pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'vscale-plugin[trl]'")
    module = __import__(example)
    module.main(example_args(model_dir, tmp_path / "out", "--report_to", "none", "--max_steps", "2"))
    saved = vsp.from_pretrained(tmp_path / "out")
    thetas = [p for n, p in saved.named_parameters() if ".vscale." in n]
    assert vsp.is_vscaled(saved) and len(thetas) == 2
    assert all(bool((t != 0).any()) for t in thetas)  # trained from 0 and saved


def test_trl_sft_example_under_its_default_bf16_autocast_gives_finite_statistics(model_dir, tmp_path):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'vscale-plugin[trl]'")
    import trl_sft

    trainer = trl_sft.build_trainer(trl_sft.parse_args(example_args(model_dir, tmp_path, "--report_to", "none")))
    assert trainer.args.bf16
    trainer.train()
    (logged,) = [e for e in trainer.state.log_history if e.get("step") == 2 and "loss" in e]
    keys = set(vsp.measure(trainer.model, torch.randint(3, 300, (2, 16)))) - set(PER_CALL)
    assert keys <= set(logged)
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in keys)


def stage_config(zero: str, tmp_path: Path) -> Path:
    """ds_configs/<zero>.json; ZeRO-0 (DeepSpeed's data parallelism without sharding) is zero1.json at stage 0."""
    if zero != "zero0":
        return ROOT / f"ds_configs/{zero}.json"
    config = json.loads((ROOT / "ds_configs/zero1.json").read_text())
    config["zero_optimization"]["stage"] = 0
    path = tmp_path / "zero0.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("example", "zero"),
    [
        ("hf_trainer", "zero0"),
        ("hf_trainer", "zero1"),
        ("hf_trainer", "zero2"),
        ("hf_trainer", "zero3"),
        ("trl_sft", "zero3"),
    ],
)
def test_two_deepspeed_ranks_with_accumulation_equal_measure(model_dir, tmp_path, example, zero):
    extra, trainer_keys = (), TRAINER_KEYS
    if example == "trl_sft":
        pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'vscale-plugin[trl]'")
        extra, trainer_keys = ("--precision", "fp32"), TRL_KEYS
    record = tmp_path / "record"
    record.mkdir()
    env = {"VSP_RECORD_DIR": str(record), "VSP_EXAMPLE": example, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MLFLOW_EXPERIMENT_NAME": "trainer-ds"}  # fmt: skip
    argv = example_args(model_dir, tmp_path / "out", "--ds_config", str(stage_config(zero, tmp_path)), *extra)
    run_deepspeed(ROOT / "tests/workers/trainer_callback.py", *argv, num_gpus=2, timeout=600, env=env)

    result = json.loads((record / "result.json").read_text())
    assert result["zero_stage"] == int(zero[-1])  # the engine the Trainer built
    batches = [b["input_ids"] for rank in (0, 1) for b in torch.load(record / f"inputs_rank{rank}.pt")]
    assert len(batches) == 4  # 2 ranks x accumulation 2
    logs = {e["step"]: e for e in result["log_history"] if "loss" in e}
    assert_close_to(logs[2], measured(model_dir, torch.load(record / "weights.pt"), batches))
    assert set(logs[1]) <= trainer_keys and set(logs[3]) <= trainer_keys
    assert not [n for n in result["decayed"] if ".vscale." in n]
    assert len(result["theta_after"]) == 2 and all(any(v != 0.0 for v in t) for t in result["theta_after"].values())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("trainer-ds").experiment_id])
    for key in logs[2]:
        if key not in trainer_keys:
            assert {m.step for m in client.get_metric_history(run.info.run_id, key)} == {2, 4}, key


def test_accelerate_loop_example_logs_due_steps_only(model_dir):
    argv = ["--model", str(model_dir), "--data", str(model_dir / "data.jsonl"), "--every", "2", "--max_steps", "4",
            "--grad_accum", "2", "--batch_size", "2", "--seq_len", "48"]  # fmt: skip
    records = accelerate_loop.main(argv)
    model = vsp.apply_vscale(AutoModelForCausalLM.from_pretrained(model_dir))
    keys = set(vsp.measure(model, torch.randint(3, 300, (2, 16))))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == set(records[2]) == {"step", "loss"}
    for record in (records[1], records[3]):
        assert keys <= set(record) and all(torch.isfinite(torch.tensor(record[k])) for k in keys)


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_accelerate_loop_under_deepspeed_on_two_ranks_equals_measure(model_dir, tmp_path, zero):
    # accelerator.backward runs the engine's backward and step in one call: the collector reads inside it.
    argv = ["--model", str(model_dir), "--data", str(model_dir / "data.jsonl"), "--every", "2", "--max_steps", "4",
            "--grad_accum", "2", "--batch_size", "2", "--seq_len", "48",
            "--ds_config", str(ROOT / f"ds_configs/{zero}.json")]  # fmt: skip
    run_deepspeed(ROOT / "tests/workers/accelerate_loop.py", *argv, num_gpus=2, timeout=600,
                  env={"VSP_RECORD_DIR": str(tmp_path)})  # fmt: skip

    engine = json.loads((tmp_path / "engine.json").read_text())
    assert engine == {"type": "DeepSpeedEngine", "zero_stage": int(zero[-1])}  # what accelerator.prepare returned
    records = json.loads((tmp_path / "records.json").read_text())
    batches = [b for rank in (0, 1) for b in torch.load(tmp_path / f"inputs_rank{rank}.pt")]
    assert len(batches) == 4  # 2 ranks x accumulation 2
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == set(records[2]) == {"step", "loss"}
    assert_close_to(records[1], measured(model_dir, torch.load(tmp_path / "weights.pt"), batches))
