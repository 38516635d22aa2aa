"""``launchers/pretrain.py`` under DeepSpeed Ulysses sequence parallelism (issue 15, item 4):
``"sequence_parallel_size": 2`` in ``--ds_config`` on 2 CPU ranks over gloo trains with the per-step losses, gradient
norms and eval/loss of a 1-rank run of the same global batch (ZeRO-1 stopped and resumed, ZeRO-3 straight with
``ds_configs/zero3_sp2.json``, whose statistics equal the 1-rank run's too), exports the 1-rank run's weights,
records its SP size with the checkpoints and refuses another on ``--resume``, and refuses what cannot work (an SP
size that does not divide the ranks or ``--seq_len``, eager attention, SP with AutoTP) with one ``error:`` line
before anything exists.

The 2 ranks form one SP group, so one data-parallel rank: both read the batches the 1-rank run reads and each trains
on its half of every sequence. Feeding them different batches, sharding wrongly or averaging the shards' losses
unweighted would each move the losses off the 1-rank run's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from vscale_plugin.launch.cli import ConfigError
from vscale_plugin.launch.ds_config import (
    check_sequence_parallel_ranks,
    fill_ds_config,
    load_ds_config,
    sequence_parallel_size,
)
from vscale_plugin.testing import metric_history
from vscale_plugin.testing.distributed import deepspeed_executable, free_port, launcher_env, run_deepspeed, run_one_rank

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "pretrain.py"
ZERO3_SP2 = REPO / "ds_configs" / "zero3_sp2.json"
ZERO1 = REPO / "ds_configs" / "zero1.json"
# 4 steps of 4 sequences: 2 micro-batches of 2 per step on the one data-parallel rank (an SP group of 2, or the single
# rank of the reference run).
COMMON = ("--max_steps", "4", "--global_batch", "4", "--micro_batch", "2", "--seed", "3", "--experiment", "sp")
STATS = ("--stats_every", "2")  # the reference and the straight ZeRO-3 SP run measure the statistics at steps 2 and 4


def _with(base: Path, path: Path, **extra) -> Path:
    path.write_text(json.dumps({**json.loads(base.read_text()), **extra}))
    return path


# ---- the checks, without a launcher ----


def test_fill_counts_data_parallel_ranks_under_sequence_parallelism():
    config = load_ds_config(ZERO3_SP2, tensor_parallel=True, sequence_parallel=True)
    assert sequence_parallel_size(config) == 2
    # 4 ranks in SP groups of 2: 2 data-parallel ranks, so a global batch of 8 at micro-batch 2 is 2 accumulation steps;
    # DeepSpeed's config counts train_batch_size over world / SP ranks too
    filled = fill_ds_config(config, micro_batch=2, global_batch=8, world_size=4, grad_clip=1.0, bf16=False,
                            pin_memory=False)  # fmt: skip
    assert filled["gradient_accumulation_steps"] == 2 and filled["train_batch_size"] == 8
    with pytest.raises(ConfigError, match=r"--global_batch 6 is not a multiple of --micro_batch 2 x 2 data-parallel "
                                          r"ranks \(4 ranks / sequence_parallel_size 2\) = 4"):  # fmt: skip
        fill_ds_config(config, micro_batch=2, global_batch=6, world_size=4, grad_clip=1.0, bf16=False, pin_memory=False)


def test_sp_sizes_that_cannot_split_the_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sequence_parallel_size 2 does not divide the 3 ranks.*--num_gpus 2\).*"
                                          r"\[1, 3\]"):  # fmt: skip
        check_sequence_parallel_ranks(2, 1, 3, seq_len=128)
    with pytest.raises(ConfigError, match=r"--seq_len 127 is not divisible by sequence_parallel_size 2.*--seq_len 126"):
        check_sequence_parallel_ranks(2, 1, 2, seq_len=127)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size 2 with tensor_parallel.autotp_size 2: .*drop one"):
        check_sequence_parallel_ranks(2, 2, 4, seq_len=128)
    check_sequence_parallel_ranks(2, 1, 4, seq_len=128)
    check_sequence_parallel_ranks(1, 2, 2, seq_len=127)  # no SP: nothing to check
    bad = _with(ZERO1, tmp_path / "sp.json", sequence_parallel_size="2")
    with pytest.raises(ConfigError, match=r'"sequence_parallel_size" must be a whole number of ranks >= 1 \(got "2"\)'):
        load_ds_config(bad, tensor_parallel=True, sequence_parallel=True)


# ---- the launcher ----


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return launcher_env(tmp_path_factory.mktemp("sp-env"))


def _one_rank(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    return run_one_rank(LAUNCHER, env, *args)


def _two_ranks_refused(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    """The launcher on 2 ranks under ``deepspeed``, for a run that fails (``run_deepspeed`` raises on that)."""
    cmd = [deepspeed_executable(), "--num_gpus", "2", "--master_port", free_port(), LAUNCHER, *args]
    return subprocess.run(list(map(str, cmd)), env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # fmt: skip


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory) -> dict:
    """A 1-rank ZeRO-1 run; a straight SP-2 run under ZeRO-3; an SP-2 ZeRO-1 run stopped at step 2 and resumed; the
    same checkpoint resumed without SP (refused)."""
    root = tmp_path_factory.mktemp("sp-runs")
    zero1_sp2 = _with(ZERO1, root / "zero1_sp2.json", sequence_parallel_size=2)
    one = _one_rank(env, "--ds_config", ZERO1, "--save_dir", root / "one", "--run_name", "one", *COMMON, *STATS)
    assert one.returncode == 0, one.stderr[-3000:]
    z3 = run_deepspeed(LAUNCHER, "--ds_config", ZERO3_SP2, "--save_dir", root / "z3", "--run_name", "z3", *COMMON,
                       *STATS, env=env, timeout=300)  # fmt: skip
    first = run_deepspeed(LAUNCHER, "--ds_config", zero1_sp2, "--save_dir", root / "sp", "--run_name", "sp", *COMMON,
                          "--stop_after_steps", "2", env=env, timeout=300)  # fmt: skip
    # the same 2 ranks without SP: 2 data-parallel ranks, each continuing data it never had
    refused = _two_ranks_refused(env, "--ds_config", ZERO1, "--save_dir", root / "sp", "--resume", *COMMON)
    second = run_deepspeed(LAUNCHER, "--ds_config", zero1_sp2, "--save_dir", root / "sp", "--resume", *COMMON,
                           env=env, timeout=300)  # fmt: skip
    return {"root": root, "first": first, "second": second, "z3": z3, "refused": refused}


def _run(env: dict[str, str], name: str):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sp")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert run.info.status == "FINISHED"
    if name != "one":
        assert run.data.params["deepspeed.sequence_parallel_size"] == "2" and run.data.params["world_size"] == "2"
    return client, run


def _losses(env: dict[str, str], name: str, key: str = "train/loss") -> dict[int, float]:
    client, run = _run(env, name)
    return metric_history(client, run.info.run_id, key)


@pytest.mark.e2e
@pytest.mark.distributed
def test_sp2_trains_like_one_rank_and_resumes_with_the_losses_of_a_run_never_stopped(runs, env):
    one, z3, resumed = (_losses(env, name) for name in ("one", "z3", "sp"))
    assert sorted(one) == sorted(z3) == sorted(resumed) == [1, 2, 3, 4]  # one MLflow run across the resume
    for step in range(1, 5):
        assert z3[step] == pytest.approx(one[step], rel=1e-5), step  # ZeRO-3 + SP 2, never stopped
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), step  # ZeRO-1 + SP 2, stopped at step 2
    assert one[4] < one[1]
    # The gradient's norm too (before clipping): a gradient summed or averaged over the SP group the wrong way would be
    # off by the SP size here, where Adam's normalisation and the clipping could hide it from the losses.
    norms = {name: _losses(env, name, "train/grad_norm") for name in ("one", "z3", "sp")}
    for step in range(1, 5):
        assert norms["z3"][step] == pytest.approx(norms["one"][step], rel=1e-5), step
        assert norms["sp"][step] == pytest.approx(norms["one"][step], rel=1e-5), step
    # eval: each rank of the SP group scores its shard of the same eval batches, combined over the group
    evals = {name: _run(env, name)[1].data.metrics["eval/loss"] for name in ("one", "z3", "sp")}
    assert evals["z3"] == pytest.approx(evals["one"], rel=1e-5) and evals["sp"] == pytest.approx(evals["one"], rel=1e-5)
    assert "stopped at step 2/4" in runs["first"].stdout and "stopped at step 4/4" in runs["second"].stdout
    summary = json.loads((runs["root"] / "sp" / "train_summary.json").read_text())
    assert summary["sequence_parallel"] == 2 and summary["global_batch"] == 4
    assert json.loads((runs["root"] / "sp" / "vscale_run.json").read_text())["settings"]["sequence_parallel"] == 2


@pytest.mark.e2e
@pytest.mark.distributed
def test_statistics_under_sp2_equal_the_one_rank_runs(runs, env):
    # the StatsCollector combines each rank's shard over the engine's SP group (vscale_plugin/stats/collector.py)
    client, sp = _run(env, "z3")
    _, one = _run(env, "one")
    measured = {k for k in one.data.metrics if k.split("/")[0] in ("gs", "as", "ma", "vscale", "qr", "grad")}
    assert len(measured) > 200 and measured <= set(sp.data.metrics)
    for key in sorted(measured):
        # abs: gs/q/tok0 is float noise around an exact 0 (token 0's query attends to itself alone)
        assert sp.data.metrics[key] == pytest.approx(one.data.metrics[key], rel=1e-3, abs=1e-9), key
    assert [m.step for m in client.get_metric_history(sp.info.run_id, "gs/ratio/median")] == [2, 4]


@pytest.mark.e2e
@pytest.mark.distributed
def test_the_export_holds_the_one_rank_runs_model(runs):
    import vscale_plugin as vsp

    # The same model as the 1-rank run's (every SP rank holds the whole model); float rounding of the sharded
    # attention moves a weight whose gradient is tiny by ~1e-5 in 4 Adam steps, as under AutoTP.
    reference = vsp.from_pretrained(runs["root"] / "one" / "hf").state_dict()
    theta = [name for name in reference if name.endswith(".vscale.theta")]
    assert len(theta) == 4
    for run in ("sp", "z3"):
        exported = vsp.from_pretrained(runs["root"] / run / "hf").state_dict()
        assert set(exported) == set(reference)
        for name, weight in reference.items():
            torch.testing.assert_close(exported[name], weight, rtol=1e-4, atol=5e-5, msg=f"{run}: {name}")
        assert any(exported[name].abs().sum() > 0 for name in theta)  # theta trained


@pytest.mark.e2e
@pytest.mark.distributed
def test_resume_with_another_sp_size_is_refused_naming_both(runs):
    error = _error(runs["refused"])
    assert "made with sequence_parallel_size 2, not 1" in error
    assert "pass a --ds_config with sequence_parallel_size 2" in error


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("extra", "flags", "error"),
    [
        ({"sequence_parallel_size": 2}, (), "sequence_parallel_size 2 does not divide the 1 ranks"),
        ({"sequence_parallel_size": 2}, ("--seq_len", "65"), "--seq_len 65 is not divisible by sequence_parallel"),
        ({"sequence_parallel_size": 2, "tensor_parallel": {"autotp_size": 2}}, (),
         "sequence_parallel_size 2 with tensor_parallel.autotp_size 2"),
    ],
)  # fmt: skip
def test_the_launcher_refuses_an_sp_run_that_cannot_split_before_anything_exists(env, tmp_path, extra, flags, error):
    config = _with(ZERO1, tmp_path / "sp.json", **extra)
    args = ("--max_steps", "1", "--global_batch", "2", "--micro_batch", "2", "--no_checkpoint", "--experiment", "sp")
    proc = _one_rank(env, "--ds_config", config, "--save_dir", tmp_path / "run", *args, *flags)
    if error is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    assert error in _error(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.distributed
def test_eager_attention_under_sp_is_refused_before_anything_exists(env, tmp_path):
    # check_sequence_parallel's model checks, on the model of the run built on the meta device, on 2 ranks
    proc = _two_ranks_refused(env, "--ds_config", ZERO3_SP2, "--save_dir", tmp_path / "run", "--attn_implementation",
                              "eager", *COMMON)  # fmt: skip
    error = _error(proc)
    assert "Ulysses sequence parallelism (size 2) for LlamaForCausalLM" in error
    assert "attn_implementation 'eager' cannot run under Ulysses" in error and "'sdpa'" in error
    assert not (tmp_path / "run").exists()
