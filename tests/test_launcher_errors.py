"""Bad input to ``launchers/pretrain.py`` (issue 3, item 9): each is a one-line ``error: ...`` naming the fix,
exit code 2, no traceback, and nothing trained, checkpointed or logged to MLflow.

Every case runs the real launcher file as a subprocess. Started as plain ``python`` it makes a one-process gloo
group itself; one case goes through the real ``deepspeed`` launcher with 2 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vscale_plugin.testing.distributed import deepspeed_executable, free_port, without_launcher_vars

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
ZERO2 = REPO / "ds_configs" / "zero2.json"
TIMEOUT_S = 120
# Variables of an enclosing launcher that would make the child join a process group that does not exist.


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VSP_CACHE shared by the module's runs (the smoke tokenizer is trained once and cached there)."""
    return tmp_path_factory.mktemp("vsp-cache")


def _env(tmp_path: Path, cache_dir: Path) -> dict[str, str]:
    env = without_launcher_vars(os.environ)
    # The venv's tools (ninja for DeepSpeed's JIT-built CPU ops) first, as the Makefile does.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        VSP_CACHE=str(cache_dir),
    )
    return env


def _launch(tmp_path: Path, cache_dir: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)],
        cwd=tmp_path,
        env=_env(tmp_path, cache_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr\n{_describe(proc)}"
    return lines[-1]


def _assert_nothing_ran(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    output = proc.stdout + proc.stderr
    assert "train:" not in output, f"training started\n{_describe(proc)}"
    assert "stopped at step" not in output, f"training ran\n{_describe(proc)}"
    assert not (tmp_path / "checkpoints").exists(), f"the default save dir was created\n{_describe(proc)}"
    db = tmp_path / "mlflow.db"
    if db.exists():
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiment_ids) if experiment_ids else []
        assert not runs, f"an MLflow run was created: {[r.info.run_id for r in runs]}"


def _assert_usage_error(proc: subprocess.CompletedProcess, tmp_path: Path, *names: str) -> str:
    """Exit 2, last stderr line ``error: ...`` containing each of ``names``, no traceback, nothing ran."""
    assert proc.returncode == 2, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    line = _error_line(proc)
    assert line.startswith("error:"), f"last stderr line is not an 'error:' line: {line!r}\n{_describe(proc)}"
    for name in names:
        assert name in line, f"{name!r} not in the error line {line!r}"
    _assert_nothing_ran(proc, tmp_path)
    return line


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---- --ds_config ----


def test_missing_ds_config_flag_exits_2_and_names_the_flag(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir)
    _assert_usage_error(proc, tmp_path, "--ds_config", "ds_configs/zero2.json")


def test_ds_config_that_does_not_exist_lists_the_available_configs(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "nope.json"
    proc = _launch(tmp_path, cache_dir, "--ds_config", missing)
    line = _assert_usage_error(proc, tmp_path, str(missing), "no such file")
    for name in ("zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"):
        assert f"ds_configs/{name}" in line, line


def test_ds_config_with_invalid_json_exits_2_and_says_so(tmp_path: Path, cache_dir: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,,}\n}\n')
    proc = _launch(tmp_path, cache_dir, "--ds_config", broken)
    _assert_usage_error(proc, tmp_path, str(broken), "not valid JSON", "line 2", "ds_configs/zero2.json")


def test_ds_config_micro_batch_conflicting_with_flag_suggests_auto(tmp_path: Path, cache_dir: Path) -> None:
    config = json.loads(ZERO2.read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "fixed_micro.json"
    path.write_text(json.dumps(config))
    proc = _launch(tmp_path, cache_dir, "--ds_config", path, "--micro_batch", "4", "--global_batch", "8")
    _assert_usage_error(proc, tmp_path, "train_micro_batch_size_per_gpu=2", "--micro_batch", "4", '"auto"')


# ---- flags ----


def test_unknown_preset_exits_2_and_lists_the_choices(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--preset", "huge")
    _assert_usage_error(proc, tmp_path, "--preset", "huge", "smoke", "0.1B", "0.3B", "1B")


def test_inconsistent_batch_settings_exit_2_and_suggest_a_global_batch(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--global_batch", "10", "--micro_batch", "4")
    _assert_usage_error(proc, tmp_path, "--global_batch 10", "--micro_batch 4", "e.g. 8")


# ---- data ----


def test_missing_dataset_path_exits_2_and_names_the_path(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "no-such-corpus.jsonl"
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", missing)
    _assert_usage_error(proc, tmp_path, f"--dataset {missing}", "no such file", "--dataset smoke")


# ---- --save_dir / --resume ----


def test_unwritable_save_dir_exits_2_and_asks_for_a_writable_one(tmp_path: Path, cache_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    save_dir = blocker / "ckpt"  # tests run as root, whom chmod does not stop; a regular file in the path does
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--save_dir", save_dir)
    _assert_usage_error(proc, tmp_path, f"--save_dir {save_dir}", "not writable", "choose a directory")
    assert blocker.read_text() == "not a directory\n"


def test_resume_without_a_checkpoint_in_save_dir_exits_2(tmp_path: Path, cache_dir: Path) -> None:
    save_dir = tmp_path / "empty-run"
    save_dir.mkdir()
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--save_dir", save_dir, "--resume")
    _assert_usage_error(proc, tmp_path, "--resume", str(save_dir), "no checkpoint", "without --resume")
    assert list(save_dir.iterdir()) == []


def test_resume_without_save_dir_exits_2_and_asks_for_it(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--resume")
    _assert_usage_error(proc, tmp_path, "--resume", "--save_dir")


def test_save_dir_holding_a_checkpoint_without_resume_exits_2_and_leaves_it_untouched(
    tmp_path: Path, cache_dir: Path
) -> None:
    save_dir = tmp_path / "old-run"
    (save_dir / "global_step12").mkdir(parents=True)
    (save_dir / "latest").write_text("global_step12")
    (save_dir / "global_step12" / "mp_rank_00_model_states.pt").write_bytes(b"\x00weights\xff" * 64)
    (save_dir / "trainer_state.json").write_text('{"step": 12}')
    before = _snapshot(save_dir)
    entries_before = sorted(p.name for p in save_dir.rglob("*"))
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--save_dir", save_dir)
    _assert_usage_error(proc, tmp_path, f"--save_dir {save_dir}", "already holds a checkpoint", "--resume")
    assert _snapshot(save_dir) == before
    assert sorted(p.name for p in save_dir.rglob("*")) == entries_before


@pytest.mark.parametrize(
    "flags", [("--save_every", "5"), ("--export_every", "5"), ("--resume",), ("--stop_after_steps", "3")]
)
def test_no_checkpoint_with_a_checkpoint_flag_exits_2_and_names_both(tmp_path: Path, cache_dir: Path, flags) -> None:
    save_dir = tmp_path / "run"
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--save_dir", save_dir, "--no_checkpoint", *flags)
    _assert_usage_error(proc, tmp_path, "--no_checkpoint", flags[0])
    assert not save_dir.exists()


def test_tracking_store_mlflow_cannot_open_exits_2_before_training(tmp_path: Path, cache_dir: Path) -> None:
    env = {**_env(tmp_path, cache_dir), "MLFLOW_TRACKING_URI": "bogus://nowhere"}
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    _assert_usage_error(proc, tmp_path, "bogus://nowhere", "MLFLOW_TRACKING_URI", "sqlite:///")


def test_an_error_after_the_process_group_exists_destroys_it_before_exiting(tmp_path: Path, cache_dir: Path) -> None:
    """A gloo group left to interpreter shutdown can turn exit 2 into an abort (exit -6, "terminate called without an
    active exception"), at random; so ``run`` must destroy it on the error path. Checked in the launcher's process."""
    config = json.loads(ZERO2.read_text())
    config["train_micro_batch_size_per_gpu"] = 2  # a usage error found after the group is made (in prepare)
    path = tmp_path / "fixed_micro.json"
    path.write_text(json.dumps(config))
    code = (
        "import sys, torch.distributed as dist\n"
        "from vscale_plugin.train.main import run\n"
        f"rc = run(['--ds_config', {str(path)!r}, '--micro_batch', '4', '--global_batch', '8'])\n"
        "print('rc', rc, 'initialized', dist.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path, cache_dir),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, _describe(proc)
    assert "rc 2 initialized False" in proc.stdout, _describe(proc)
    assert "train_micro_batch_size_per_gpu=2" in _error_line(proc)


def test_exit_after_distributed_keeps_the_code_and_runs_atexit_handlers(tmp_path: Path) -> None:
    """The launcher's exit skips interpreter finalization (where gloo can abort the process), not atexit handlers
    (MLflow's, logging's, compile workers'), nor the exit code."""
    code = (
        "import atexit, sys\n"
        "from vscale_plugin.launch.distributed import distributed, exit_after_distributed\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "with distributed():\n"
        "    print('body ran', flush=True)\n"
        "exit_after_distributed(3)\n"
        "print('not reached')\n"
    )
    env = without_launcher_vars(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 3, _describe(proc)
    assert proc.stdout.splitlines()[-2:] == ["body ran", "atexit ran"], _describe(proc)


# ---- through the real deepspeed launcher ----


@pytest.mark.distributed
def test_missing_dataset_path_under_deepspeed_launcher_exits_2(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "no-such-corpus.jsonl"
    cmd = [
        str(deepspeed_executable()),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(LAUNCHER),
        "--ds_config",
        str(ZERO2),
        "--dataset",
        str(missing),
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path, cache_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
    )
    assert proc.returncode == 2, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors, f"no 'error:' line\n{_describe(proc)}"
    assert all(f"--dataset {missing}" in line and "--dataset smoke" in line for line in errors), errors
    _assert_nothing_ran(proc, tmp_path)


# ---- flags that used to be misread, or to fail with a traceback ----


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_learning_rate_that_is_not_positive_exits_2(tmp_path: Path, cache_dir: Path, value: str) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--lr", value)
    _assert_usage_error(proc, tmp_path, f"--lr {value}", "> 0")


def test_a_min_lr_above_the_peak_exits_2_instead_of_a_schedule_that_climbs(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--lr", "1e-3", "--min_lr", "1e-2")
    _assert_usage_error(proc, tmp_path, "--min_lr 0.01", "--lr 0.001", "--min_lr 0.0001")


def test_a_min_lr_above_the_preset_peak_names_the_preset(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--min_lr", "0.01")  # smoke's peak: 3e-3
    _assert_usage_error(proc, tmp_path, "--min_lr 0.01", "lr 0.003 (the smoke preset's)")


def test_stats_every_beyond_max_steps_exits_2_instead_of_measuring_nothing(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--max_steps", "10", "--stats_every", "50")
    _assert_usage_error(proc, tmp_path, "--stats_every 50", "--max_steps 10", "--stats_every 10 or less")


def test_a_malformed_synthetic_task_exits_2_naming_the_option(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", "bigram_backcopy:vocab=64,trigers=3")
    _assert_usage_error(proc, tmp_path, "'trigers=3' is not an option", "vocab, triggers, sparsity, task_seed")


def test_a_tokenizer_for_the_synthetic_task_exits_2_and_says_to_drop_it(tmp_path: Path, cache_dir: Path) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--preset", "sinklab", "--tokenizer", "gpt2")
    _assert_usage_error(proc, tmp_path, "--tokenizer gpt2", "own vocabulary", "drop --tokenizer")


# ---- data that passes the path check but cannot train ----


def _corpus(path: Path, documents: int, words: int = 30) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(["the cat sat on the mat"] * words)}) + "\n"
                            for _ in range(documents)))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level Hugging Face tokenizer directory for the words of ``_corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("words")
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "the", "cat", "sat", "on", "mat"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    return path


def _assert_no_checkpoint(save_dir: Path) -> None:
    assert not (save_dir / "latest").exists() and not list(save_dir.glob("step*")), sorted(save_dir.rglob("*"))


def test_an_empty_jsonl_exits_2_naming_the_file(tmp_path: Path, cache_dir: Path, words: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", empty, "--tokenizer", words,
                   "--save_dir", tmp_path / "run")  # fmt: skip
    _assert_usage_error(proc, tmp_path, f"--dataset {empty}", "empty")


def test_a_binary_file_named_jsonl_exits_2_naming_the_file(tmp_path: Path, cache_dir: Path, words: Path) -> None:
    binary = tmp_path / "corpus.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", binary, "--tokenizer", words,
                   "--save_dir", tmp_path / "run")  # fmt: skip
    _assert_usage_error(proc, tmp_path, str(binary), "cannot be read")
    _assert_no_checkpoint(tmp_path / "run")


def test_a_dataset_too_small_for_the_eval_slice_exits_2_before_training(
    tmp_path: Path, cache_dir: Path, words: Path
) -> None:
    # Before the fix this trained max_steps/10 steps and failed at the first evaluation.
    small = _corpus(tmp_path / "small.jsonl", documents=5)
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", small, "--tokenizer", words,
                   "--save_dir", tmp_path / "run", "--max_steps", "20")  # fmt: skip
    _assert_usage_error(proc, tmp_path, str(small), "eval slice", "add documents")
    _assert_no_checkpoint(tmp_path / "run")


def test_an_eval_split_shorter_than_one_batch_exits_2_before_training(
    tmp_path: Path, cache_dir: Path, words: Path
) -> None:
    # 20 documents: 2 held out, far fewer tokens than one 4 x 128 batch, so eval/loss would be the mean of nothing.
    small = _corpus(tmp_path / "small.jsonl", documents=20, words=2)
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--dataset", small, "--tokenizer", words,
                   "--save_dir", tmp_path / "run", "--max_steps", "20")  # fmt: skip
    _assert_usage_error(proc, tmp_path, str(small), "eval split", "--micro_batch or --seq_len")
    _assert_no_checkpoint(tmp_path / "run")


def test_a_dataset_path_without_tokenizer_and_no_hub_fails_at_once_naming_tokenizer(
    tmp_path: Path, cache_dir: Path
) -> None:
    # A hub that does not answer (a closed local port), an empty HF cache, and no HF_HUB_OFFLINE: the default
    # tokenizer for a path is gpt2 from the hub. Before the fix the error blamed the hub after ~50 s of retries.
    corpus = _corpus(tmp_path / "corpus.jsonl", documents=40)
    env = _env(tmp_path, cache_dir)
    del env["HF_HUB_OFFLINE"]
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--ds_config", str(ZERO2), "--dataset", str(corpus)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    _assert_usage_error(proc, tmp_path, "gpt2", "does not answer", "--tokenizer")


# ---- --init_from: what is not a model it can continue ----


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved Hugging Face models: a tiny Llama of 64 positions, and a GPT-2 (an architecture V-scale lacks)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vscale_plugin.testing.models import tiny_model

    root = tmp_path_factory.mktemp("hf-models")
    tiny_model("llama", max_position_embeddings=64).save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    return root


def test_init_from_a_directory_that_is_no_model_exits_2(tmp_path: Path, cache_dir: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model\n")
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--init_from", notes)
    _assert_usage_error(proc, tmp_path, f"--init_from {notes}", "not a Hugging Face model", "save_pretrained")


def test_init_from_a_config_without_weights_exits_2(tmp_path: Path, cache_dir: Path, hf_models: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((hf_models / "llama" / "config.json").read_bytes())
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--init_from", bare)
    _assert_usage_error(proc, tmp_path, f"--init_from {bare}", "no weights", "model.safetensors")


def test_init_from_an_architecture_without_vscale_exits_2_and_says_how_to_go_on(
    tmp_path: Path, cache_dir: Path, hf_models: Path
) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--init_from", hf_models / "gpt2")
    _assert_usage_error(proc, tmp_path, "gpt2", "llama", "--vscale off")


def test_init_from_with_a_seq_len_beyond_its_positions_exits_2(
    tmp_path: Path, cache_dir: Path, hf_models: Path
) -> None:
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--init_from", hf_models / "llama", "--seq_len", "128")
    _assert_usage_error(proc, tmp_path, "--seq_len 128", "64 positions", "--seq_len 64 or less")


def test_init_from_a_training_checkpoint_points_to_resume(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "old-run"
    (run / "step00000002").mkdir(parents=True)
    (run / "latest").write_text("step00000002")
    proc = _launch(tmp_path, cache_dir, "--ds_config", ZERO2, "--init_from", run)
    _assert_usage_error(proc, tmp_path, f"--init_from {run}", f"--resume --save_dir {run}")
