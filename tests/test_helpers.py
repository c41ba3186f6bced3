"""The test helpers keep their promises: a timed-out command leaves no process behind (its
shell's background children included), and the per-test reaper stops what a test forgot."""

import os
import subprocess

import pytest

from .helpers.processes import run, spawn, stop_started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_timed_out_command_takes_its_background_children_with_it(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run(["bash", "-c", script], timeout=2)
    child = int(pidfile.read_text())
    assert not _alive(child)


def test_the_reaper_stops_what_a_test_started_and_left_running(tmp_path):
    proc = spawn(["bash", "-c", "sleep 300 & wait"], stdout=subprocess.DEVNULL)
    assert proc.poll() is None
    assert stop_started("test") == 1  # what the autouse fixture does after every test
    assert proc.poll() is not None
