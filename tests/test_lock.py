"""One writer per pipeline root: a second command is refused at once, naming the holder; a killed holder leaves
no lock behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.lock import root_lock

HOLD = "import sys, time\nfrom soup_pipeline.runtime.lock import root_lock\nwith root_lock(sys.argv[1], 'test'):\n" \
       "    print('held', flush=True)\n    time.sleep(600)\n"


@pytest.fixture
def start_holder():
    """start_holder(root): a process holding root's lock for 600 s, in a process group of its own; the group is killed
    after the test whatever happened in it (a failed assertion before the test's own kill included)."""
    started: list[subprocess.Popen] = []

    def start(root) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:  # not killed and reaped by the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()


def test_a_second_command_on_the_same_root_is_refused_with_the_holder_named(tmp_path):
    with root_lock(tmp_path, "soup"):
        done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--root", str(tmp_path), "prepare"],
                              capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert f"is in use: pid {os.getpid()} (`soup-pipeline soup`" in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "runs" / "data").exists()  # refused before any work
        with pytest.raises(SoupError, match="is in use"):
            with root_lock(tmp_path, "run"):
                pass
    with root_lock(tmp_path, "prepare"):  # released after its holder finished
        pass


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, start_holder):
    holder = start_holder(tmp_path)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SoupError, match=f"pid {holder.pid}"):
        with root_lock(tmp_path, "run"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # the file stays, the lock does not
    assert (tmp_path / "runs" / ".lock").read_text().startswith(f"pid {holder.pid}")
    with root_lock(tmp_path, "run"):
        assert (tmp_path / "runs" / ".lock").read_text().startswith(f"pid {os.getpid()}")


def test_the_next_writer_removes_what_a_killed_writer_left_half_written(tmp_path):
    from soup_pipeline.runtime.atomic import atomic_path

    target = tmp_path / "runs" / "soups" / "greedy" / "soup.safetensors"
    script = ("import os, sys\nfrom soup_pipeline.runtime.atomic import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    (left,) = list(target.parent.iterdir())  # the killed writer's temporary file, and no target
    assert left.name.startswith(".soup.safetensors.") and left.name.endswith(".tmp")
    with atomic_path(target.with_name("beta.json")) as tmp:
        tmp.write_text("{}")
    with root_lock(tmp_path, "soup"):
        assert sorted(p.name for p in target.parent.iterdir()) == ["beta.json"]
