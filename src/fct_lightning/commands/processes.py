"""Processes that end with the process that started them (Linux), so a kill -9 leaves nothing training.

Two places start processes that must not outlive their parent:

* ``fct-versions`` runs every ``fct-fit`` as a child (:func:`child_process`). Killed, it would leave that child
  training while the same command, started again, trains the same run from a second process.
* Lightning's DDP launcher starts ranks 1..N-1 of ``fct-fit`` / ``fct-embed`` / ``fct-transform`` as children of
  rank 0, and stops them only from rank 0's own SIGTERM handler. After a kill -9 of rank 0 they wait in their next
  collective, holding their GPUs, until the process-group timeout (30 minutes by default).

Both get SIGKILL when the parent ends (Linux's parent-death signal), not SIGTERM: under DDP, Lightning's SIGTERM
handler broadcasts from inside the handler and, with rank 0's peers in another collective, all ranks hang (seen with
``fct-versions ... --trainer.devices 2 --trainer.strategy ddp`` killed on a 2-core CPU: both ranks were still there,
idle, 45 s later). Every run resumes from its ``last.ckpt`` (``--resume auto``), which is what kill -9 relies on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

#: environment variable by which a command tells the DDP workers it launches its process id
LAUNCHER_PID = "FCT_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux, else None. Looked up before any fork: dlopen after fork in a process with threads
    (torch's) can deadlock the child."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def stop_with_parent(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook that has the child SIGKILLed when ``parent`` ends (kill -9 included); None off Linux (the
    child then runs on, and a second fct-fit into its folder is refused by its run lock)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent ended before the hook ran
            os._exit(1)

    return hook


def child_process(cmd: Sequence[str]) -> int:
    """Run ``cmd`` as a child that is stopped with this process (:func:`stop_with_parent`); its exit status."""
    return subprocess.run(list(cmd), check=False, preexec_fn=stop_with_parent(os.getpid())).returncode


def stop_with_launcher() -> None:
    """Called first by every command. In a DDP worker that a launcher started (``LOCAL_RANK`` in the environment it
    was given: Lightning's ranks > 0, torchrun's every rank), ask Linux to SIGKILL this process when its launcher
    ends; when a command of this package launched it (:data:`LAUNCHER_PID`, the parent's pid) and that parent has
    already gone, exit at once. Anywhere else, record this process's pid for the workers it may launch."""
    launcher = os.environ.get(LAUNCHER_PID, "")
    # a process that launched workers has LOCAL_RANK=0 set in its own environment afterwards (Lightning does): a
    # second command in it (the Python API, tests) is still the launcher, not a worker
    if os.environ.get("LOCAL_RANK") is None or launcher == str(os.getpid()):
        os.environ[LAUNCHER_PID] = str(os.getpid())
        return
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if launcher.isdigit() and os.getppid() != int(launcher):
        os._exit(1)
