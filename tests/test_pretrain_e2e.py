"""The launcher end to end: 2 ranks through the real `deepspeed` launcher on CPU, logged to a real `mlflow server`.

Issue 3's "done when": a baseline and a V-scale smoke run in MLflow with falling loss and every training metric;
12 steps + resume to 24 gives the same per-step losses as 24 straight steps, in ONE MLflow run, no step twice.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from vscale_plugin.testing import metric_history
from vscale_plugin.testing.distributed import run_deepspeed
from vscale_plugin.testing.mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
ZERO2 = REPO / "ds_configs" / "zero2.json"
TRAIN_KEYS = {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/tokens_per_s", "perf/step_s"}

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """The server .ci/run started (VSP_TEST_MLFLOW_URI), or one of our own on 127.0.0.1."""
    if os.environ.get("VSP_TEST_MLFLOW_URI"):
        yield os.environ["VSP_TEST_MLFLOW_URI"]
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server.uri
    server.kill()


@pytest.fixture(scope="module")
def env(tracking_uri, tmp_path_factory):
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "VSP_CACHE": str(tmp_path_factory.mktemp("cache")),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two ranks on two cores
    }


def _train(env, save_dir, *flags):
    return run_deepspeed(LAUNCHER, "--ds_config", ZERO2, "--save_dir", save_dir, "--experiment", "e2e", *flags,
                         env=env, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
    """Four launcher invocations shared by the tests: straight 24, 12 + resume, and a 12-step baseline."""
    root = tmp_path_factory.mktemp("runs")
    common = ("--max_steps", "24", "--eval_every", "12", "--seed", "3")
    # The straight run also measures the statistics: its losses must still equal the resumed run's.
    straight = _train(env, root / "straight", *common, "--run_name", "straight", "--stats_every", "12")
    first = _train(env, root / "resumed", *common, "--run_name", "resumed", "--stop_after_steps", "12")
    second = _train(env, root / "resumed", *common, "--resume")
    baseline = _train(env, root / "baseline", "--max_steps", "12", "--vscale", "off", "--run_name", "baseline")
    return {"root": root, "straight": straight, "first": first, "second": second, "baseline": baseline}


def _run(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("e2e")
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(found) == 1, f"{len(found)} runs named {name}"
    return found[0]


def test_vscale_and_baseline_runs_log_every_training_metric_and_loss_falls(runs, tracking_uri):
    client = MlflowClient(tracking_uri)
    for name, steps, mode in (("straight", 24, "learned"), ("baseline", 12, "off")):
        run = _run(client, name)
        assert run.info.status == "FINISHED"
        assert set(run.data.metrics) >= TRAIN_KEYS
        assert run.data.tags["vscale"] == mode and run.data.tags["preset"] == "smoke"
        assert run.data.params["vscale"] == mode
        assert run.data.params["world_size"] == "2"
        assert "model.hidden_size" in run.data.params and "deepspeed.zero_optimization.stage" in run.data.params
        assert run.data.params["git_commit"] and run.data.params["package_version"]
        losses = metric_history(client, run.info.run_id)
        assert sorted(losses) == list(range(1, steps + 1))
        first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in range(steps - 2, steps + 1)) / 3
        assert last < first - 0.3, (name, losses)


def test_resume_continues_one_run_with_the_same_losses_as_a_straight_run(runs, tracking_uri):
    client = MlflowClient(tracking_uri)
    straight = metric_history(client, _run(client, "straight").info.run_id)
    resumed_run = _run(client, "resumed")
    resumed = metric_history(client, resumed_run.info.run_id)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(1, 25):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    assert resumed_run.info.status == "FINISHED"
    lr = {m.step: m.value for m in client.get_metric_history(resumed_run.info.run_id, "train/lr")}
    straight_lr = {m.step: m.value for m in client.get_metric_history(_run(client, "straight").info.run_id, "train/lr")}
    assert lr == pytest.approx(straight_lr, rel=1e-9)


def test_stop_after_steps_leaves_a_checkpoint_and_a_running_run(runs):
    assert "stopped at step 12/24" in runs["first"].stdout
    assert "stopped at step 24/24" in runs["second"].stdout
    assert (runs["root"] / "resumed" / "step00000012").is_dir()
    assert (runs["root"] / "resumed" / "latest").read_text().strip() == "step00000024"


def test_progress_bar_only_on_rank_zero(runs):
    out = runs["straight"].stdout + runs["straight"].stderr
    assert out.count("MLflow: experiment 'e2e'") == 1
    assert "train:" in out


def test_train_summary_holds_the_median_of_the_logged_step_times(runs, tracking_uri):
    client = MlflowClient(tracking_uri)
    for name, save_dir, steps in (("straight", "straight", range(1, 25)), ("resumed", "resumed", range(13, 25))):
        summary = json.loads((runs["root"] / save_dir / "train_summary.json").read_text())
        history = {m.step: m.value for m in client.get_metric_history(_run(client, name).info.run_id, "perf/step_s")}
        skip = summary["warmup_steps_excluded"]
        assert summary["steps_this_invocation"] == len(steps) and 0 < skip <= 5
        expected = statistics.median(history[s] for s in list(steps)[skip:])
        assert summary["median_step_s"] == pytest.approx(expected, rel=1e-9)
        assert summary["median_tokens_per_s"] == pytest.approx(16 * 128 / expected, rel=1e-9)
        assert summary["step"] == 24 and summary["world_size"] == 2 and summary["median_mfu"] is None
        losses = metric_history(client, _run(client, name).info.run_id)
        assert summary["train_loss"] == pytest.approx(losses[24], rel=1e-6)


def test_a_cpu_run_leaves_no_deepspeed_buffers_in_dev_shm(env, tmp_path):
    # DeepSpeed's CPU all-reduce creates a 66 MB /dev/shm segment per rank and never removes it; left there, the
    # segments of many runs fill the machine's memory.
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    proc = _train(env, tmp_path / "ckpt", "--max_steps", "2", "--no_checkpoint")
    assert "stopped at step 2/2" in proc.stdout
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()


def test_no_checkpoint_run_writes_a_summary_and_no_checkpoint(env, tmp_path):
    save_dir = tmp_path / "throughput"
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--max_steps", "4", "--save_dir", str(save_dir),
         "--experiment", "e2e", "--no_checkpoint"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at step 4/4; no checkpoint" in proc.stdout
    assert not (save_dir / "latest").exists() and not list(save_dir.glob("step*"))
    summary = json.loads((save_dir / "train_summary.json").read_text())
    assert summary["steps_this_invocation"] == 4 and summary["median_tokens_per_s"] > 0


@pytest.mark.slow
def test_compiled_vscale_kernel_trains_like_the_eager_one(env, tmp_path):
    summaries = {}
    for kernel in ("eager", "compiled"):
        save_dir = tmp_path / kernel
        proc = subprocess.run(
            [sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--max_steps", "3", "--save_dir",
             str(save_dir), "--experiment", "e2e", "--vscale_kernel", kernel, "--no_checkpoint", "--seed", "5"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "compiled V-scale kernel is unavailable" not in proc.stderr  # it really ran compiled
        summaries[kernel] = json.loads((save_dir / "train_summary.json").read_text())
    assert summaries["compiled"]["vscale_kernel"] == "compiled"
    assert summaries["compiled"]["train_loss"] == pytest.approx(summaries["eager"]["train_loss"], rel=1e-4)
    assert summaries["compiled"]["eval_loss"] == pytest.approx(summaries["eager"]["eval_loss"], rel=1e-4)


def test_training_goes_on_when_mlflow_is_unreachable(env, tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--max_steps", "4", "--save_dir",
         str(tmp_path / "ckpt"), "--experiment", "e2e"],
        env={**os.environ, **env, "MLFLOW_TRACKING_URI": dead}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at step 4/4" in proc.stdout
    assert (tmp_path / "ckpt" / "latest").is_file()
    spooled = "".join(p.read_text() for p in (tmp_path / "ckpt" / "mlflow-spool").rglob("*") if p.is_file())
    assert "train/loss" in spooled
    assert proc.stderr.lower().count("unreachable") + proc.stderr.lower().count("not reachable") >= 1


def test_init_from_continues_a_hugging_face_model_with_its_own_tokenizer(env, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vscale_plugin.testing.models import tiny_model

    model_dir = tmp_path / "hf-model"
    vocab = {**{f"w{i}": i for i in range(126)}, "[UNK]": 126, "</s>": 127}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>").save_pretrained(model_dir)
    tiny_model("mistral").save_pretrained(model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--init_from", str(model_dir), "--max_steps", "3",
         "--save_dir", str(tmp_path / "ckpt"), "--experiment", "init", "--vscale", "fixed"],
        env={**os.environ, **env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("init").experiment_id])
    assert run.data.params["init_from"] == str(model_dir)
    assert run.data.params["model.model_type"] == "mistral"
    assert run.data.tags["preset"] == "init_from" and run.data.tags["vscale"] == "fixed"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3


@pytest.mark.parametrize(
    ("config", "flags"),
    [("zero1.json", ("--activation_checkpointing",)), ("zero3.json", ()), ("zero2_offload.json", ())],
)
def test_every_shipped_deepspeed_config_trains(env, tmp_path, config, flags):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_deepspeed(LAUNCHER, "--ds_config", REPO / "ds_configs" / config, "--max_steps", "3", "--save_dir",
                         tmp_path / "ckpt", "--experiment", "configs", *flags,
                         env={**env, "MLFLOW_TRACKING_URI": uri}, timeout=900)  # fmt: skip
    assert "stopped at step 3/3" in proc.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("configs").experiment_id])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 3 and all(0 < loss < 9 for loss in losses)
    stage = {"zero1.json": "1", "zero3.json": "3", "zero2_offload.json": "2"}[config]
    assert run.data.params["deepspeed.zero_optimization.stage"] == stage


def _spec_keys(layers: int, kv_heads: int) -> set[str]:
    """Every SPEC section 4 statistics key of a learned-V-scale model."""
    keys = {"gs/ratio/median", "as/sink_rate/mean", "ma/h_out/tok0/max", "ma/mlp_out/tok0/max"}
    for layer in range(layers):
        tag = f"L{layer:02d}"
        keys |= {f"as/{m}/{tag}" for m in ("sink_rate", "mass", "mass_sq")} | {f"gs/ratio/{tag}"}
        keys |= {f"grad/{p}/{tag}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "vscale")}
        keys |= {f"vscale/lambda/{tag}/H{h}" for h in range(kv_heads)}
        for where in ("tok0", "rest"):
            keys |= {f"ma/{p}/{where}/{tag}" for p in ("h_in", "h_half", "h_out", "attn_out", "mlp_out", "v")}
            keys |= {f"gs/{p}/{where}/{tag}" for p in ("grad_in", "q", "k", "v")}
            keys |= {f"gs/{r}_{b}/{where}/{tag}" for r in ("bloat", "compress", "change") for b in ("attn", "mlp")}
            keys.add(f"vscale/phi/{where}/{tag}")
    return keys


def test_stats_every_logs_every_spec_key_and_the_profiles(runs, tracking_uri):
    client = MlflowClient(tracking_uri)
    run = _run(client, "straight")
    assert _spec_keys(layers=4, kv_heads=2) <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "gs/ratio/median")] == [12, 24]
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "stats"))
    assert artifacts == ["stats/profiles_step00000012.json", "stats/profiles_step00000024.json"]
    baseline = _run(client, "baseline")
    assert not any(k.startswith(("gs/", "as/", "ma/")) for k in baseline.data.metrics)
