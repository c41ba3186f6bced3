"""Processes a test starts: each in its own process group, registered, and stopped with its
whole group (a shell's background server included) when the test or fixture that started
it ends, fails or times out. Waits scale with B4M_TEST_SLOWDOWN on a slow or busy machine."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time

SLOWDOWN = float(os.environ.get("B4M_TEST_SLOWDOWN", "1"))
_started: list[tuple[subprocess.Popen, str]] = []  # (process, "test" | "fixture")


def scaled(seconds: float) -> float:
    """A wait or timeout, stretched by B4M_TEST_SLOWDOWN (default 1)."""
    return seconds * SLOWDOWN


def _port_range() -> tuple[int, int]:
    """Ports for this test process's servers: below the kernel's ephemeral range (where any
    outgoing connection may take a port between our check and the server's bind), one
    slice per xdist process (so two processes never pick the same port)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (index % 8) * 1500
    return low, low + 1500


def free_port() -> int:
    low, high = _port_range()
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: try another
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something true; fail after `timeout` (scaled) seconds."""
    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {scaled(timeout):.0f} s waiting for {what}")


def spawn(cmd, owner: str = "test", **kw) -> subprocess.Popen:
    """Start `cmd` in a new process group and register it; `owner="fixture"` for processes a
    module- or session-scoped fixture stops itself."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append((proc, owner))
    return proc


def run(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    """`subprocess.run` whose whole process group is stopped on a timeout or any error."""
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=scaled(timeout))
    finally:
        stop(proc, grace=5)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def sigkill(proc: subprocess.Popen) -> None:
    """Kill the process alone (a crash), not its group."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace` seconds; also reaps children
    that outlived their parent in the group."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # whatever is left of the group
    if proc.poll() is None:
        proc.wait(timeout=10)
    # a signal is delivered asynchronously: wait until no member of the group still runs
    # (a condition, not a speed: the deadline is only there to never hang)
    deadline = time.monotonic() + 30
    while _group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_running(pgid: int) -> bool:
    """Does any process of group `pgid` still run (zombies, exited but not reaped, do not)?"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def stop_started(owner: str | None = None) -> int:
    """Stop every registered process (of `owner`, if given) still running; returns how many."""
    n = 0
    for proc, who in list(_started):
        if owner is None or who == owner:
            if proc.poll() is None:
                n += 1
            stop(proc, grace=5)
            _started.remove((proc, who))
    return n
