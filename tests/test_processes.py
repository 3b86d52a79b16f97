"""Processes end with the process that started them: fct-versions' fct-fit children and Lightning's DDP workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fct_lightning.commands.processes import LAUNCHER_PID

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

# a child that ignores SIGTERM, as Lightning's handler does under DDP (it broadcasts, and hangs, instead of exiting)
IGNORES_SIGTERM = "import signal; signal.signal(signal.SIGTERM, lambda *a: None); "


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _kill_parent_and_wait_for(parent: subprocess.Popen, pid_file: Path) -> bool:
    """kill -9 ``parent`` once its descendant wrote ``pid_file``; whether that descendant is still alive 20 s later."""
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def test_a_killed_fct_versions_takes_its_training_child_with_it(tmp_path):
    """kill -9 of fct-versions left its fct-fit child training (the same command started again then trained the same
    run from a second process); with the parent-death signal SIGTERM, a DDP child that catches it lived on too."""
    pid_file = tmp_path / "child.pid"
    child = IGNORES_SIGTERM + f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from fct_lightning.commands.processes import "
                               f"child_process; child_process([sys.executable, '-c', {child!r}])"])
    assert not _kill_parent_and_wait_for(parent, pid_file)


def test_a_ddp_worker_ends_with_the_rank_that_launched_it(tmp_path):
    """Lightning's ranks > 0 outlived a kill -9 of rank 0: they waited in their next collective, holding their
    devices, for the process group's timeout."""
    pid_file = tmp_path / "worker.pid"
    worker = (IGNORES_SIGTERM + "from fct_lightning.commands.processes import stop_with_launcher; "
              f"stop_with_launcher(); import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
              "time.sleep(120)")
    launcher = ("import os, subprocess, sys, time; from fct_lightning.commands.processes import stop_with_launcher; "
                "stop_with_launcher(); os.environ['LOCAL_RANK'] = '0'; "  # as Lightning's launcher sets it
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], env=dict(os.environ, LOCAL_RANK='1')); "
                "time.sleep(120)")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", LAUNCHER_PID)}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    assert not _kill_parent_and_wait_for(parent, pid_file)


def test_a_worker_whose_launcher_is_already_gone_exits_at_once():
    env = dict(os.environ, LOCAL_RANK="1", **{LAUNCHER_PID: "999999999"})
    out = subprocess.run([sys.executable, "-c", "from fct_lightning.commands.processes import stop_with_launcher; "
                          "stop_with_launcher(); print('trained on')"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "trained on" not in out.stdout


def test_the_launcher_running_a_second_command_is_not_taken_for_a_worker():
    """After launching workers, Lightning leaves LOCAL_RANK=0 in the launcher's own environment; a second command in
    that process (the Python API, a test) must not take itself for an orphaned worker and exit."""
    code = ("import os; from fct_lightning.commands.processes import stop_with_launcher; stop_with_launcher(); "
            "os.environ['LOCAL_RANK'] = '0'; stop_with_launcher(); print('still here')")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", LAUNCHER_PID)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "still here" in out.stdout
