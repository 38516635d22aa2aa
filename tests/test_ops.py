"""DeepSpeed's JIT-built ops: a build lock left by a killed build does not hang the next process group."""

import os
import subprocess
import sys
import threading
import time

import pytest

from vscale_plugin.launch import ops
from vscale_plugin.testing.distributed import without_launcher_vars

# A one-rank process group, as every launcher starts it: DeepSpeed builds its CPU shared-memory all-reduce op then.
_START = (
    "from vscale_plugin.launch.distributed import distributed\n"
    "with distributed() as (rank, world_size):\n"
    "    print('process group of', world_size)\n"
)


def _start(env, timeout):
    return subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_lock_left_by_a_killed_build_does_not_hang_the_process_group(tmp_path):
    env = without_launcher_vars(os.environ)
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    built = _start(env, timeout=900)  # builds the op into the empty directory
    assert built.returncode == 0, built.stderr[-3000:]
    build_dir = tmp_path / "extensions" / "deepspeed_shm_comm"
    assert any(build_dir.glob("*.so")), sorted(p.name for p in build_dir.iterdir())
    # What torch's builder leaves when it is killed between taking its lock and releasing it; before the fix every
    # later process waited on this file forever.
    (build_dir / "lock").touch()
    os.utime(build_dir / "lock", (time.time() - ops.FOREIGN_BUILD_S - 1,) * 2)
    try:
        again = _start(env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the process group waited on the stale build lock")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "process group of 1" in again.stdout
    assert "removing" in again.stderr and "stopped half-way" in again.stderr
    assert not (build_dir / "lock").exists()


def test_a_lock_that_one_of_our_builds_left_is_removed_at_once(tmp_path):
    build = tmp_path / "op"
    build.mkdir()
    (build / "lock").touch()  # fresh, but our marker says our builder held it and died
    (build / ops._OURS).touch()
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="stopped half-way"), ops._building(build):
        assert not (build / "lock").exists()
        assert (build / ops._OURS).exists()
    assert time.monotonic() - t0 < ops.FOREIGN_BUILD_S
    assert not (build / ops._OURS).exists()


def test_a_fresh_lock_of_another_builder_is_waited_on_then_taken_for_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "FOREIGN_BUILD_S", 1.0)
    build = tmp_path / "op"
    build.mkdir()
    (build / "lock").touch()  # no marker: perhaps DeepSpeed building on its own, so it gets its time
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="stopped half-way"), ops._building(build):
        waited = time.monotonic() - t0
    assert waited >= 0.9
    assert not (build / "lock").exists()


def test_a_lock_released_by_its_builder_ends_the_wait_without_removing_anything(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(ops, "FOREIGN_BUILD_S", 600.0)
    build = tmp_path / "op"
    build.mkdir()
    (build / "lock").touch()
    release = threading.Timer(0.5, (build / "lock").unlink)  # the other builder finishes
    release.start()
    with ops._building(build):
        assert not (build / "lock").exists()
    release.join()
    assert not [w for w in recwarn if "stopped half-way" in str(w.message)]


def test_without_a_lock_nothing_is_removed(tmp_path, recwarn):
    build = tmp_path / "op"
    build.mkdir()
    with ops._building(build):
        assert (build / ops._OURS).exists()
    assert not (build / ops._OURS).exists()
    assert not [w for w in recwarn if "stopped half-way" in str(w.message)]
