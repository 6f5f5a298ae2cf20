"""The process supervisor: what it starts, it stops (children of children too), a
process that ignores SIGTERM is killed after the grace period, and start-up failures
raise ProcessError with what the operator needs (exit code, the log's last lines)."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fixtures.process import Managed, ProcessError, Supervisor, free_port, pid_alive
from fixtures.wait import eventually

SLEEPER = "import time; time.sleep(120)"

# Starts a grandchild in the same process group, records both pids, then sleeps
# (or, with "exit", exits at once and leaves the grandchild behind).
PARENT = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(tmp, sys.argv[1])
if sys.argv[2] == "exit":
    sys.exit(0)
time.sleep(120)
"""

IGNORES_SIGTERM = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(120)
"""




def file_written(path: Path):
    def check() -> str:
        assert path.exists() and path.read_text(), f"{path.name} not written yet"
        return path.read_text()
    return check


def reap(pids: list[int]) -> None:
    """Kill by pid whatever this test started and the supervisor left running."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_close_stops_child_and_grandchild(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    sup = Supervisor()
    pids: list[int] = []
    try:
        proc = sup.start(Managed("parent", [sys.executable, "-c", PARENT, str(pids_file), "sleep"],
                                 tmp_path / "parent.log", health=file_written(pids_file)), timeout=30)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert pids[0] == proc.pid
        assert all(pid_alive(p) for p in pids)
        sup.close()
        eventually(lambda: not any(pid_alive(p) for p in pids), timeout=5, what="child and grandchild gone")
    finally:
        sup.close()
        reap(pids)


def test_close_stops_a_grandchild_whose_parent_already_exited(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    sup = Supervisor()
    pids: list[int] = []
    try:
        proc = sup.start(Managed("parent", [sys.executable, "-c", PARENT, str(pids_file), "exit"],
                                 tmp_path / "parent.log"), wait=False)
        pids = [int(p) for p in eventually(file_written(pids_file), timeout=30).split()]
        eventually(lambda: proc.popen.poll() is not None, timeout=10, what="parent exited")
        assert pid_alive(pids[1])
        sup.close()
        eventually(lambda: not pid_alive(pids[1]), timeout=2, what="grandchild gone")
    finally:
        sup.close()
        reap(pids)


def test_child_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    sup = Supervisor()
    proc = None
    try:
        proc = sup.start(Managed("stubborn", [sys.executable, "-c", IGNORES_SIGTERM, str(ready)],
                                 tmp_path / "stubborn.log", health=file_written(ready)), timeout=30)
        started = time.monotonic()
        proc.stop(grace=0.5)
        elapsed = time.monotonic() - started
        assert proc.popen.returncode == -signal.SIGKILL
        assert 0.5 <= elapsed < 5, f"stopped after {elapsed:.2f}s"
        assert not pid_alive(proc.pid)
    finally:
        sup.close()
        if proc is not None and proc.pid:
            reap([proc.pid])


def test_health_check_that_never_passes_raises_with_the_log_tail(tmp_path: Path) -> None:
    script = ("import time\nfor i in range(40): print(f'boot line {i:02d} of 40')\n"
              "print('stuck waiting for the database', flush=True)\ntime.sleep(120)")

    def never() -> None:
        raise AssertionError("port 1 refused")

    sup = Supervisor()
    proc = Managed("never-ready", [sys.executable, "-c", script], tmp_path / "never-ready.log", health=never)
    try:
        sup.add(proc)
        proc._spawn()
        # The log is complete before the health check starts failing for good.
        eventually(lambda: "stuck waiting" in (tmp_path / "never-ready.log").read_text(), timeout=30)
        with pytest.raises(ProcessError) as err:
            proc.wait_healthy(0.5)
        message = str(err.value)
        assert "never-ready not healthy" in message and "port 1 refused" in message
        assert str(tmp_path / "never-ready.log") in message
        assert "stuck waiting for the database" in message
        assert "boot line 11 of 40" in message  # the last 30 lines, no more
        assert "boot line 10 of 40" not in message
        assert proc.running(), "a failed health check must not stop the process by itself"
    finally:
        sup.close()
    assert not pid_alive(proc.pid)


def test_child_exiting_during_start_raises_with_its_exit_code(tmp_path: Path) -> None:
    script = "import sys; print('fatal: config file /etc/app.yaml not found', flush=True); sys.exit(3)"

    def never() -> None:
        raise AssertionError("not listening yet")

    sup = Supervisor()
    try:
        with pytest.raises(ProcessError) as err:
            sup.start(Managed("crasher", [sys.executable, "-c", script], tmp_path / "crasher.log", health=never),
                      timeout=30)
        message = str(err.value)
        assert "crasher exited with code 3 while starting" in message
        assert "fatal: config file /etc/app.yaml not found" in message
    finally:
        sup.close()


def test_free_port_never_repeats_even_across_threads() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        ports = list(pool.map(lambda _: free_port(), range(400)))
    assert len(set(ports)) == len(ports), sorted(p for p in ports if ports.count(p) > 1)
    assert all(1024 < p < 65536 for p in ports)
