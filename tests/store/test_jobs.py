"""Store writers as jobs: killed with SIGKILL and run again, refused while another job writes, split over
processes (each writing its own shards, one finalize publishing the space)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fct_lightning.store import StoreLocked, create_store, finalize_space, open_store, verify_store, write_space
from tests.store import job
from tests.store.conftest import tree

JOB = Path(__file__).with_name("job.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(JOB), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the job did not get there in time")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def test_a_job_killed_mid_shard_resumes_to_the_same_bytes(tmp_path, reference):
    path = tmp_path / "store"
    progress = path / "old" / ".progress"
    proc = _start(str(path), "--slow_write", "0.02")
    _wait_for(lambda: (progress / "part-00000.json").exists() and (progress / "part-00001.tmp").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((progress / "part-00001.lock").read_text())["pid"] == proc.pid  # a dead job's lock file
    assert sorted(p.name for p in (path / "old").glob("*.npy")) == ["part-00000.npy"]  # complete shards only
    assert "old" not in open_store(path).spaces and verify_store(path) == []
    assert job.run(str(path)) == [1, 2, 3, 4, 5]  # shard 0 is kept; the stale lock does not block
    assert tree(path) == reference
    store = open_store(path)
    ids = [i for s in range(len(store.shards)) for i in store.ids(s)]
    assert ids == job.items() and len(set(ids)) == job.ROWS


def test_a_second_job_on_the_same_space_is_refused_at_once(tmp_path):
    path = tmp_path / "store"
    proc = _start(str(path), "--sleep", "0.3")
    lock = path / "old" / ".progress" / "part-00000.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().strip(), proc)
    started = time.monotonic()
    with pytest.raises(StoreLocked, match=rf"shard part-00000 of space 'old' .* is being written by another job "
                                          rf"\(.*\"pid\": {proc.pid}.*Wait for that job to end, or stop it"):
        job.run(str(path))
    assert time.monotonic() - started < 5
    _finish(proc)
    assert open_store(path).space("old").role == "old"


def test_disjoint_shards_in_parallel_and_one_finalize(tmp_path, reference):
    path = tmp_path / "store"
    create_store(path, job.items(), labels=np.arange(job.ROWS) % 5, shard_rows=job.SHARD_ROWS)
    procs = [_start(str(path), "--part", f"{r}/2", "--sleep", "0.3") for r in range(2)]
    outs = [_finish(p) for p in procs]
    assert [json.loads(o) for o in outs] == [[0, 2, 4], [1, 3, 5]]
    assert "old" not in open_store(path).spaces  # parts do not publish
    finalize_space(path, "old")
    inode = (path / "manifest.json").stat().st_ino
    finalize_space(path, "old")  # idempotent: nothing replaced
    assert (path / "manifest.json").stat().st_ino == inode
    assert tree(path) == reference  # as one process writes it
    assert write_space(path, "old", job.SPEC, lambda i: 1 / 0) == []


def test_finalize_refuses_a_space_with_shards_missing(tmp_path):
    path = tmp_path / "store"
    job.run(str(path), part="1/3")
    with pytest.raises(ValueError, match=r"cannot be published yet: shard part-00000 is not written yet; shard "
                                         r"part-00002 is not written yet.*Run the writers of those shards"):
        finalize_space(path, "old")
    assert "old" not in open_store(path).spaces
