"""The process group of a launcher: join the one ``deepspeed``/``torchrun`` made (or make a one-process one), leave
it on every exit path, exit without gloo's shutdown abort, and the few collectives every launcher needs."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from vscale_plugin.data import DataError
from vscale_plugin.launch.cli import ConfigError, fail
from vscale_plugin.launch.ops import load_op


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (deepspeed, torchrun), or make a one-process group."""
    import deepspeed

    if "RANK" not in os.environ:  # started as plain `python launchers/pretrain.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # The op DeepSpeed's process group builds on first use (CPU's shared-memory all-reduce), built here so that a
    # stale build lock cannot hang the start; DeepSpeed then finds it loaded.
    load_op("ShareMemCommBuilder", compatible_only=True)
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """``init_distributed`` for the body of a ``with``; the process group is destroyed when it ends, on every path,
    so that a caller in the same process (a test, a notebook) is left without it. A process that exits afterwards
    should do so through :func:`exit_after_distributed`, which also keeps gloo from aborting it at shutdown."""
    ranks = init_distributed()
    try:
        yield ranks
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_after_distributed(code: int) -> NoReturn:
    """Exit with ``code`` after a ``with distributed()`` body: atexit handlers run, interpreter finalization does not.

    Tearing down the interpreter of a process that has run gloo collectives can abort it with "terminate called
    without an active exception" (exit -6) even after ``destroy_process_group``: DeepSpeed's engine still holds its
    process groups, and they are destroyed during finalization (pytorch/pytorch#190489, #179291). CI saw it at random
    on both a usage error's exit 2 and a finished run's exit 0. Everything worth keeping is done by then (MLflow run
    closed, checkpoints written), and the atexit handlers (logging, compile workers) still run.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unlink_shm_buffer() -> None:
    """Remove the name of this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce (its shm comm op).

    DeepSpeed creates one 66 MB segment per rank and never unlinks it, so every CPU run under the deepspeed launcher
    left its segments in /dev/shm (memory that is only freed by deleting them) until the machine ran out. Once every
    rank has mapped every other rank's segment, which ``init_distributed`` does before returning (hence the
    barrier), the names are no longer needed: the mappings stay valid and the memory goes when the ranks exit.
    """
    dist.barrier()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def rank0_first(fn, *args, **kwargs):
    """Run ``fn`` on rank 0, then on the others (e.g. training and caching a tokenizer once). An exception on
    rank 0 is re-raised on every rank, so no rank waits forever."""
    error: list[Any] = [None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except (DataError, ConfigError) as err:
            error = [_as_text(err)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise _from_text(error[0])
    return result if dist.get_rank() == 0 else fn(*args, **kwargs)


def on_every_rank(fn, *args, **kwargs):
    """Run ``fn`` on every rank; when it raises DataError/ConfigError on any rank, raise that error (the lowest such
    rank's) on every rank. A check that fails on one rank alone (its share of the data) thus stops all of them at
    the same point, before their next collective, with one message that rank 0 can report for all."""
    error = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except (DataError, ConfigError) as err:
        error = _as_text(err)
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise _from_text(first)
    return result


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself without a process group): for what each rank would
    compute a little differently, such as the time a run started."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _as_text(err: DataError | ConfigError) -> str:
    return f"{type(err).__name__}:{err}"


def _from_text(text: str) -> DataError | ConfigError:
    kind, message = text.split(":", 1)
    return (DataError if kind == "DataError" else ConfigError)(message)


def mean_over_ranks(values: list[float]) -> float:
    t = torch.tensor([sum(values), len(values)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_launcher(parse_args: Callable[[list[str] | None], Any], body: Callable[[Any, int, int], int],
                 argv: list[str] | None = None) -> int:  # fmt: skip
    """A launcher's main: its flags parsed (a bad one is the ``error:`` line and exit 2, before any process group),
    then ``body(args, rank, world_size)`` inside :func:`distributed`; returns the exit code."""
    try:
        args = parse_args(argv)
    except ConfigError as err:
        return fail(str(err))
    with distributed() as (rank, world_size):
        return body(args, rank, world_size)
