"""Run a script on several ranks through the real ``deepspeed`` launcher, as users start training.

Works without a GPU: DeepSpeed then picks its CPU accelerator (gloo / shm), one process per "GPU".
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

_TAIL_CHARS = 6000
_GRACE_S = 15


# What a distributed launcher sets for its ranks; a test that starts a launcher itself removes them first, so that
# the run does not think it is one rank of the test's own job.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_launcher_vars(env: Mapping[str, str], *also: str) -> dict[str, str]:
    """``env`` without :data:`LAUNCHER_VARS` (and the names in ``also``)."""
    drop = {*LAUNCHER_VARS, *also}
    return {k: v for k, v in env.items() if k not in drop}


def launcher_env(root: Path) -> dict[str, str]:
    """The environment of a launcher test: this interpreter's scripts first on PATH (``deepspeed``), offline, MLflow
    in ``root/mlflow.db``, the data cache in ``root/cache``, one thread per rank, no launcher variables inherited."""
    env = without_launcher_vars(os.environ)
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        VSP_CACHE=str(root / "cache"),
        OMP_NUM_THREADS="1",
    )
    return env


def run_one_rank(script: str | Path, env: Mapping[str, str], *args: Any, timeout: float = 300):
    """``script`` as plain ``python``: one rank, its own process group; the CompletedProcess (output captured)."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=dict(env), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_executable() -> Path:
    """The ``deepspeed`` launcher of the running interpreter's environment.

    Taken from next to ``sys.executable`` rather than ``PATH`` so that the ranks run in the same virtual
    environment as the test, whichever shell started it.
    """
    exe = Path(sys.executable).parent / "deepspeed"
    if exe.is_file():
        return exe
    # pip install --target DIR (wheels carried to an offline host) puts it in DIR/bin, which PATH then names
    found = shutil.which("deepspeed")
    if found is None:
        raise FileNotFoundError(
            f"no deepspeed launcher next to {sys.executable} or on PATH; install deepspeed in this environment"
        )
    return Path(found)


def _tail(text: str) -> str:
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


def _stop(popen: subprocess.Popen) -> tuple[str, str]:
    """Stop the launcher and every rank; return what they printed."""
    # SIGTERM first: the launcher then kills each rank's whole process tree, including compilers of a JIT build
    # that sit in process groups of their own. SIGKILL of our group is the fallback for a launcher that hangs.
    os.killpg(popen.pid, signal.SIGTERM)
    try:
        return popen.communicate(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        return popen.communicate()


def run_deepspeed(
    script: str | Path,
    *args: str | Path,
    num_gpus: int = 2,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``deepspeed --num_gpus N --master_port P script args`` and return the finished process.

    ``env`` is laid over the current environment. stdout and stderr are captured as text. Raises AssertionError
    with the tail of both when the launcher exits non-zero (it does when any rank fails).
    """
    cmd = [
        str(deepspeed_executable()),
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    full_env = dict(os.environ)
    # DeepSpeed JIT-builds its CPU ops with the first `ninja` on PATH; two ninja versions (the venv's and the
    # system's) discard each other's build logs and rebuild every time. The Makefile puts the venv first; so do we.
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    if env:
        full_env.update(env)
    # A session of its own, so that a timeout can stop the ranks too, not only the launcher above them.
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True
    ) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _stop(popen)
            raise AssertionError(
                f"{' '.join(cmd)} timed out after {timeout} s\n"
                f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
            ) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )
    return proc


def run_worker_ranks(
    worker: str | Path, out: Path, num_gpus: int = 2, timeout: float = 600, env: Mapping[str, str] | None = None
) -> list[dict]:
    """Run a worker script on ``num_gpus`` ranks with ``--out out`` (and ``env`` over the environment) and return
    what each rank wrote to ``out/rank{R}.json`` (a dict with at least ``rank`` and ``world_size``), in rank order."""
    import json

    run_deepspeed(worker, "--out", out, num_gpus=num_gpus, timeout=timeout, env=env)
    results = []
    for rank in range(num_gpus):
        path = Path(out) / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no results"
        results.append(json.loads(path.read_text()))
    assert [r["rank"] for r in results] == list(range(num_gpus))
    assert all(r["world_size"] == num_gpus for r in results)
    return results


# ---- the rank side of run_worker_ranks ----


def worker_main(work: Callable[[Path, int, int], dict]) -> NoReturn:
    """The ``main`` of a worker script that :func:`run_worker_ranks` starts: parses ``--out`` (and the launcher's
    ``--local_rank``), runs ``work(out, rank, world_size)`` in the launcher's process group, writes the dict it returns
    (with ``rank`` and ``world_size`` added) to ``out/rank{R}.json`` once every rank has finished, and exits as a
    process that ran gloo collectives must (:func:`~vscale_plugin.launch.distributed.exit_after_distributed`)."""
    import argparse
    import json

    import torch.distributed as dist

    from vscale_plugin.launch.distributed import distributed, exit_after_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    # The launcher's process group: it frees DeepSpeed's /dev/shm buffer names and destroys the group at the end.
    with distributed() as (rank, world):
        result = {"rank": rank, "world_size": world, **work(args.out, rank, world)}
        dist.barrier()
        (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    exit_after_distributed(0)


def engine_config(
    stage: int,
    micro_batch: int,
    world_size: int,
    accumulation: int = 1,
    lr: float | None = None,
    clip: float | None = None,
    **zero: Any,
) -> dict:
    """A DeepSpeed config for a test engine: ZeRO ``stage`` (plus the ``zero`` options), its batch sizes, and with
    ``lr`` DeepSpeed's own AdamW (betas 0.9/0.95, no weight decay); without it the caller passes an optimizer."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "zero_optimization": {"stage": stage, **zero},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if clip is not None:
        config["gradient_clipping"] = clip
    if lr is not None:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
        }
    return config


def gathered(params: list[Any]) -> list[list[float]]:
    """The full values of (possibly ZeRO-3-partitioned) parameters; a collective, every rank calls it."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().float().cpu().tolist() for p in params]


def full_state_dict(model: Any) -> dict[str, Any]:
    """A copy of ``model``'s full state dict, gathered where ZeRO-3 partitions it; a collective under ZeRO-3."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class UlyssesRun:
    """A test engine under DeepSpeed Ulysses sequence parallelism: ``model`` (sdpa) of ``sp`` ranks, one data-parallel
    replica, fed by DeepSpeed's ``UlyssesSPDataLoaderAdapter`` from ``rows`` (this rank's dicts of ``input_ids``,
    ``position_ids`` and ``labels``, ``micro_batch`` at a time: the adapter hands every rank its shard of rank 0's
    micro-batch, then of rank 1's, ...). ``loss()`` runs the next micro-batch's forward and returns the loss of the
    whole sequences (:func:`~vscale_plugin.hf.sequence_parallel.sequence_parallel_loss`)."""

    def __init__(self, model: Any, sp: int, stage: int, rows: list[dict], rank: int, micro_batch: int, lr: float):
        import deepspeed
        import torch
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter

        seq_len = rows[0]["input_ids"].shape[-1]
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, "sdpa", sp, micro_batch_size=micro_batch, seq_length=seq_len, seq_length_is_variable=False
        )
        config = engine_config(stage, micro_batch, 1, lr=lr)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
        self.stage = stage
        self.group = mpu.get_sequence_parallel_group()
        rows_loader = torch.utils.data.DataLoader(rows, batch_size=micro_batch)
        self._micro = iter(UlyssesSPDataLoaderAdapter(rows_loader, rank, self.group, sp, "cpu"))
        self.inputs: dict[str, Any] = {}

    def loss(self):
        from vscale_plugin.hf.sequence_parallel import sequence_parallel_loss

        # The adapter's shards are slices of the gathered rows; on a GPU its .cpu() copies them, on the CPU it does
        # not, and transformers' loss then fails on .view(-1) of the strided shift_labels.
        self.inputs = {k: v.contiguous() for k, v in next(self._micro).items()}
        labels = self.inputs["shift_labels"]
        shard = self.engine(input_ids=self.inputs["input_ids"], position_ids=self.inputs["position_ids"],
                            labels=labels, shift_labels=labels, use_cache=False).loss  # fmt: skip
        return sequence_parallel_loss(shard, labels, self.group, zero_stage=self.stage)
