"""DeepSpeed's just-in-time C++ ops, built so that a build killed half-way cannot hang every later run.

DeepSpeed compiles some ops on first use with ``torch.utils.cpp_extension.load``: on CPU the shared-memory all-reduce
(``deepspeed_shm_comm``, when the process group starts) and ``cpu_adam`` (optimizer offload). torch guards each build
with a lock file in the extension's build directory (``~/.cache/torch_extensions/...``) that only the builder removes.
When the builder dies mid-build (a timeout, ``kill``, the end of a CI job), the file stays, and every later process
that loads the op waits on it forever, silently: our CI once spent its 90 minutes so, on its very first launcher.

:func:`load_op` builds under an advisory lock of our own instead (``flock``, which the kernel releases when its holder
dies), so that a lock file found while holding it is known to be stale, and removes it. DeepSpeed keeps the loaded
module and does not build it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

# A lock file left by a builder that did not take our lock (DeepSpeed used on its own) is waited on for this long
# past its creation before it is taken for stale: a build of these ops takes about a minute on 2 cores.
FOREIGN_BUILD_S = 15 * 60
_OURS = ".vscale_plugin_building"  # in the build directory while one of our processes builds


def load_op(builder_name: str, compatible_only: bool = False):
    """DeepSpeed's op of ``builder_name`` (e.g. "ShareMemCommBuilder", "CPUAdamBuilder"), built if need be, with a
    stale build lock removed first; None when this accelerator has no such op, or (``compatible_only``) when DeepSpeed
    would not use it here. A build failure raises, as DeepSpeed's own load would."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or (compatible_only and not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)):
        return None
    if installed_ops.get(builder.name, False):  # compiled at install time (DS_BUILD_OPS=1): nothing to build
        return builder.load(verbose=False)
    with _building(_build_directory(builder.name)):
        return builder.load(verbose=False)


def _build_directory(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    path = Path(_get_build_directory(name, verbose=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _building(build_dir: Path) -> Iterator[None]:
    """Hold our lock on ``build_dir`` for the body, having removed torch's lock file there if it is stale."""
    with open(build_dir.parent / f"{build_dir.name}.vscale_plugin.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # blocks while another of our processes builds; released if it dies
        baton, ours = build_dir / "lock", build_dir / _OURS
        if baton.exists() and not ours.exists():
            _wait_for_foreign_build(baton)
        if baton.exists():
            warnings.warn(
                f"removing {baton}: a build of this DeepSpeed op that was stopped half-way left it, and every load "
                "of the op would wait on it forever",
                stacklevel=4,
            )
            baton.unlink(missing_ok=True)
        ours.touch()
        try:
            yield
        finally:
            ours.unlink(missing_ok=True)


def _wait_for_foreign_build(baton: Path) -> None:
    """Wait while a lock file that a process outside ours may hold is younger than FOREIGN_BUILD_S."""
    while True:
        try:
            age = time.time() - os.stat(baton).st_mtime
        except FileNotFoundError:
            return
        if age >= FOREIGN_BUILD_S:
            return
        time.sleep(min(0.5, FOREIGN_BUILD_S - age))
