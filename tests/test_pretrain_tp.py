"""``launchers/pretrain.py`` under DeepSpeed AutoTP (issue 15, item 4): ``"tensor_parallel": {"autotp_size": 2}`` in
``--ds_config`` on 2 CPU ranks over gloo trains with the per-step losses of a 1-rank run of the same global batch
(ZeRO-1 and ZeRO-3) and its statistics, resumes with the losses of a run never stopped, exports whole weights and the
whole theta, continues a checkpoint with another TP size from DeepSpeed's universal checkpoint (and says how to make
it), and refuses what cannot work (a TP size that does not divide the ranks or the KV heads, a DeepSpeed too old)
with one ``error:`` line before anything trains.

The ranks of one TP group must train on the same batches: the data is split over the data-parallel ranks
(``rank // autotp_size``; DeepSpeed's TP groups are consecutive ranks). DeepSpeed's own check compares the first
batch over each TP group, so a data path that fed them different batches would fail these runs at the first step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from vscale_plugin.launch.cli import ConfigError, UsageError
from vscale_plugin.launch.ds_config import (
    CONFIG_DIR,
    check_kv_heads,
    check_tensor_parallel,
    fill_ds_config,
    load_ds_config,
    tensor_parallel_size,
)
from vscale_plugin.testing import metric_history
from vscale_plugin.testing.distributed import launcher_env, run_deepspeed, run_one_rank
from vscale_plugin.train.checkpoint import resharded_from

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
ZERO1_TP2 = REPO / "ds_configs" / "zero1_tp2.json"
ZERO1 = REPO / "ds_configs" / "zero1.json"
# 4 steps of 4 sequences: 2 micro-batches of 2 per step on the one data-parallel rank of a TP group of 2 (and on the
# single rank of the reference run).
COMMON = ("--max_steps", "4", "--global_batch", "4", "--micro_batch", "2", "--seed", "3", "--experiment", "tp")
STATS = ("--stats_every", "2")  # the reference and the straight TP run measure the statistics at steps 2 and 4


# ---- the checks, without a launcher ----


def test_fill_counts_data_parallel_ranks_and_leaves_train_batch_size_to_deepspeed():
    config = load_ds_config(ZERO1_TP2, tensor_parallel=True)
    assert tensor_parallel_size(config) == 2
    # 4 ranks in TP groups of 2: 2 data-parallel ranks, so a global batch of 8 at micro-batch 2 is 2 accumulation steps
    filled = fill_ds_config(config, micro_batch=2, global_batch=8, world_size=4, grad_clip=1.0, bf16=False,
                            pin_memory=False)  # fmt: skip
    assert filled["gradient_accumulation_steps"] == 2 and filled["train_micro_batch_size_per_gpu"] == 2
    assert "train_batch_size" not in filled and filled["tensor_parallel"] == {"autotp_size": 2}
    with pytest.raises(ConfigError, match=r"--global_batch 6 is not a multiple of --micro_batch 2 x 2 data-parallel "
                                          r"ranks \(4 ranks / autotp_size 2\) = 4"):  # fmt: skip
        fill_ds_config(config, micro_batch=2, global_batch=6, world_size=4, grad_clip=1.0, bf16=False, pin_memory=False)
    with pytest.raises(
        ConfigError, match=r'sets train_batch_size under tensor_parallel.autotp_size 2; set it to "auto"'
    ):
        fill_ds_config({**config, "train_batch_size": 8}, micro_batch=2, global_batch=8, world_size=4, grad_clip=1.0,
                       bf16=False, pin_memory=False)  # fmt: skip


def test_a_tp_size_that_does_not_divide_the_ranks_or_the_kv_heads_is_refused():
    with pytest.raises(ConfigError, match=r"autotp_size 2 does not divide the 3 ranks.*--num_gpus 2\).*\[1, 3\]"):
        check_tensor_parallel(2, 3, zero_stage=1)
    with pytest.raises(
        ConfigError, match=r"autotp_size 4 does not divide the 2 KV heads of the smoke preset.*\[1, 2\]"
    ):
        check_kv_heads(4, 2, "the smoke preset")
    check_tensor_parallel(2, 4, zero_stage=1)
    check_kv_heads(2, 2, "the smoke preset")


@pytest.mark.parametrize(
    ("version", "stage", "error"),
    [
        ("0.16.3", 1, r"AutoTP training needs DeepSpeed >= 0.16.4, this is 0.16.3"),
        ("0.16.4", 1, None),
        ("0.19.3", 3, r"with ZeRO-3: AutoTP under ZeRO-3 needs DeepSpeed >= 0.19.4, this is 0.19.3.*zero1_tp2"),
        ("0.19.3", 2, None),
        ("0.19.4", 3, None),
        ("0.15.0", 3, r"AutoTP training needs DeepSpeed >= 0.16.4"),
    ],
)
def test_a_deepspeed_too_old_for_autotp_is_refused(version, stage, error):
    if error is None:
        check_tensor_parallel(2, 2, zero_stage=stage, deepspeed_version=version)
    else:
        with pytest.raises(ConfigError, match=error):
            check_tensor_parallel(2, 2, zero_stage=stage, deepspeed_version=version)
    check_tensor_parallel(1, 3, zero_stage=3, deepspeed_version="0.10.0")  # no TP: nothing to check


def test_other_launchers_refuse_sequence_parallelism_and_tp(tmp_path):
    path = tmp_path / "sp.json"
    path.write_text(json.dumps({**json.loads(ZERO1.read_text()), "sequence_parallel_size": 2}))
    with pytest.raises(ConfigError, match=r"sequence_parallel_size 2: this launcher does not run sequence parallelism"):
        load_ds_config(path, tensor_parallel=True)
    # launchers/analyze.py reads its config without tensor_parallel: its data path gives every rank its own batches
    with pytest.raises(ConfigError, match=r"autotp_size 2: this launcher does not run tensor parallelism"):
        load_ds_config(ZERO1_TP2)
    path.write_text(json.dumps({**json.loads(ZERO1.read_text()), "tensor_parallel": {"autotp_size": "two"}}))
    with pytest.raises(ConfigError, match=r'"tensor_parallel" must be \{"autotp_size": N\}'):
        load_ds_config(path, tensor_parallel=True)


# ---- the launcher ----


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return launcher_env(tmp_path_factory.mktemp("tp-env"))


def _one_rank(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    return run_one_rank(LAUNCHER, env, *args)


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict:
    """A 1-rank ZeRO-1 run; a straight TP-2 run under ZeRO-3; a TP-2 ZeRO-1 run stopped at step 2 and resumed."""
    root = tmp_path_factory.mktemp("tp-runs")
    zero3_tp2 = root / "zero3_tp2.json"
    zero3_tp2.write_text(json.dumps({**json.loads((CONFIG_DIR / "zero3.json").read_text()),
                                     "tensor_parallel": {"autotp_size": 2}}))  # fmt: skip
    one = _one_rank(env, "--ds_config", ZERO1, "--save_dir", root / "one", "--run_name", "one", *COMMON, *STATS)
    assert one.returncode == 0, one.stderr[-3000:]
    z3 = run_deepspeed(LAUNCHER, "--ds_config", zero3_tp2, "--save_dir", root / "z3", "--run_name", "z3", *COMMON,
                       *STATS, env=env, timeout=300)  # fmt: skip
    first = run_deepspeed(LAUNCHER, "--ds_config", ZERO1_TP2, "--save_dir", root / "tp", "--run_name", "tp", *COMMON,
                          "--stop_after_steps", "2", env=env, timeout=300)  # fmt: skip
    second = run_deepspeed(LAUNCHER, "--ds_config", ZERO1_TP2, "--save_dir", root / "tp", "--resume", *COMMON,
                           env=env, timeout=300)  # fmt: skip
    # TP 2 on 2 ranks stopped at step 2, continued without TP on 1 rank: refused until the checkpoint is converted to
    # DeepSpeed's universal form by the command the error names, then continued from it.
    resharded = root / "resharded"
    run_deepspeed(LAUNCHER, "--ds_config", ZERO1_TP2, "--save_dir", resharded, "--run_name", "resharded", *COMMON,
                  "--stop_after_steps", "2", env=env, timeout=300)  # fmt: skip
    refused = _one_rank(env, "--ds_config", ZERO1, "--save_dir", resharded, "--resume", *COMMON)
    command = refused.stderr.split("(python -m ", 1)[-1].split(")", 1)[0].split()
    converted = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    continued = _one_rank(env, "--ds_config", ZERO1, "--save_dir", resharded, "--resume", *COMMON)
    assert continued.returncode == 0, continued.stderr[-3000:]
    return {"root": root, "first": first, "second": second, "z3": z3, "refused": refused, "continued": continued}


def _run(env: dict[str, str], name: str):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tp")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert run.info.status == "FINISHED"
    if name != "one":
        assert run.data.params["deepspeed.tensor_parallel.autotp_size"] == "2" and run.data.params["world_size"] == "2"
    return client, run


def _losses(env: dict[str, str], name: str) -> dict[int, float]:
    client, run = _run(env, name)
    return metric_history(client, run.info.run_id)


@pytest.mark.e2e
@pytest.mark.distributed
def test_tp2_trains_like_one_rank_and_resumes_with_the_losses_of_a_run_never_stopped(runs, env):
    one, z3, resumed = (_losses(env, name) for name in ("one", "z3", "tp"))
    assert sorted(one) == sorted(z3) == sorted(resumed) == [1, 2, 3, 4]  # one MLflow run across the resume
    for step in range(1, 5):
        assert z3[step] == pytest.approx(one[step], rel=1e-5), step  # ZeRO-3 + TP 2, never stopped
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), step  # ZeRO-1 + TP 2, stopped at step 2
        assert resumed[step] == pytest.approx(z3[step], rel=1e-5), step
    assert one[4] < one[1]
    # eval reads the same slice on every rank of a TP group too: the 1-rank run's eval/loss
    evals = {name: _run(env, name)[1].data.metrics["eval/loss"] for name in ("one", "z3", "tp")}
    assert evals["z3"] == pytest.approx(evals["one"], rel=1e-5) and evals["tp"] == pytest.approx(evals["one"], rel=1e-5)
    assert "stopped at step 2/4" in runs["first"].stdout and "stopped at step 4/4" in runs["second"].stdout
    summary = json.loads((runs["root"] / "tp" / "train_summary.json").read_text())
    assert summary["tensor_parallel"] == 2 and summary["global_batch"] == 4


@pytest.mark.e2e
@pytest.mark.distributed
def test_statistics_under_tp2_equal_the_one_rank_runs(runs, env):
    client, tp = _run(env, "z3")
    _, one = _run(env, "one")
    measured = {k for k in one.data.metrics if k.split("/")[0] in ("gs", "as", "ma", "vscale", "qr", "grad")}
    assert len(measured) > 200 and measured <= set(tp.data.metrics)
    for key in sorted(measured):
        # abs: gs/q/tok0 is ~1e-11, float noise around an exact 0 (token 0's query attends to itself alone, so its
        # softmax passes no gradient), against ~1e-5 for gs/q/rest
        assert tp.data.metrics[key] == pytest.approx(one.data.metrics[key], rel=1e-3, abs=1e-9), key
    assert [m.step for m in client.get_metric_history(tp.info.run_id, "gs/ratio/median")] == [2, 4]


@pytest.mark.e2e
@pytest.mark.distributed
def test_the_checkpoint_has_each_tp_ranks_shards_and_the_export_the_whole_model(runs):
    import vscale_plugin as vsp

    step = runs["root"] / "tp" / "step00000004"
    shards = [torch.load(step / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"] for r in (0, 1)]
    exported = vsp.from_pretrained(runs["root"] / "tp" / "hf").state_dict()
    assert set(exported) == set(shards[0]) == set(shards[1])
    split = 0
    for name, whole in exported.items():
        a, b = shards[0][name], shards[1][name]
        if a.shape == b.shape == whole.shape:  # replicated on both TP ranks: norms, theta
            assert torch.equal(whole, a) and torch.equal(whole, b), name
            continue
        dim = next(d for d in range(whole.dim()) if whole.shape[d] == a.shape[d] + b.shape[d])
        assert torch.equal(whole, torch.cat([a, b], dim=dim)), name  # the engine's full weight, exactly
        split += 1
    assert split >= 7 * 4  # q, k, v, o, gate, up, down of every layer were TP shards
    theta = [name for name in exported if name.endswith(".vscale.theta")]
    assert len(theta) == 4 and all(exported[name].shape == (2,) for name in theta)  # every KV head's theta
    assert shards[0]["model.layers.0.self_attn.v_proj.weight"].shape == (32, 128)  # one KV head of 32 per rank
    # The same model as the 1-rank run's, and the ZeRO-3 TP run's export too. Adam divides by sqrt(v): float
    # rounding of the sharded matmuls moves a weight whose gradient is tiny by ~1e-5 in 4 steps (a tenth of a step).
    reference = vsp.from_pretrained(runs["root"] / "one" / "hf").state_dict()
    for other in (exported, vsp.from_pretrained(runs["root"] / "z3" / "hf").state_dict()):
        assert set(other) == set(reference)
        for name, weight in reference.items():
            torch.testing.assert_close(other[name], weight, rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.e2e
@pytest.mark.distributed
def test_resume_with_another_tp_size_continues_from_the_universal_checkpoint_the_error_asks_for(runs, env):
    save_dir = runs["root"] / "resharded"
    refused = runs["refused"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr
    assert "made with tensor_parallel.autotp_size 2, not 1. To continue it with autotp_size 1, convert it" in errors[0]
    assert f"--output_folder {save_dir / 'step00000002_universal'} --inject_missing_state" in errors[0]
    assert "or pass a --ds_config with autotp_size 2" in errors[0]
    # continued on 1 rank without TP: the losses of the runs never stopped, in the same MLflow run
    resharded, one = _losses(env, "resharded"), _losses(env, "one")
    assert sorted(resharded) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resharded[step] == pytest.approx(one[step], rel=1e-5), step
    assert "stopped at step 4/4" in runs["continued"].stdout
    assert json.loads((save_dir / "vscale_run.json").read_text())["settings"]["tensor_parallel"] == 1


def test_resume_with_another_tp_size_needs_as_many_data_parallel_ranks_and_zero_1_or_2(tmp_path):
    recorded = {"tensor_parallel": 2, "world_size": 4, "zero_stage": 1}
    (tmp_path / "latest").write_text("step00000002")
    assert resharded_from(recorded, world_size=4, tp=2, zero_stage=1, save_dir=tmp_path) is None  # the same size
    with pytest.raises(UsageError, match=r"autotp_size 2, not 1, on 2 data-parallel ranks \(4 ranks / 2\), not 4.*"
                                         r"launch 2 ranks for autotp_size 1"):  # fmt: skip
        resharded_from(recorded, world_size=4, tp=1, zero_stage=1, save_dir=tmp_path)
    with pytest.raises(UsageError, match=r"ZeRO-3 checkpoint with another tensor-parallel size is not verified"):
        resharded_from({**recorded, "zero_stage": 3}, world_size=2, tp=1, zero_stage=3, save_dir=tmp_path)
    with pytest.raises(UsageError, match=r"convert it to a DeepSpeed universal checkpoint first"):
        resharded_from(recorded, world_size=2, tp=1, zero_stage=1, save_dir=tmp_path)
    (tmp_path / "step00000002_universal" / "zero").mkdir(parents=True)
    assert resharded_from(recorded, world_size=2, tp=1, zero_stage=1, save_dir=tmp_path) == 2


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("size", "error"),
    [
        (2, "tensor_parallel.autotp_size 2 does not divide the 1 ranks"),
        (4, "tensor_parallel.autotp_size 4 does not divide the 2 KV heads of the smoke preset"),
    ],
)
def test_the_launcher_refuses_a_tp_size_that_cannot_split_before_anything_exists(env, tmp_path, size, error):
    config = tmp_path / "tp.json"
    config.write_text(json.dumps({**json.loads(ZERO1.read_text()), "tensor_parallel": {"autotp_size": size}}))
    proc = _one_rank(env, "--ds_config", config, "--save_dir", tmp_path / "run", *COMMON)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and error in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
