"""fct-transform on stores: the evaluated gallery shard by shard, resumable after kill -9, split over jobs, refusing
inputs from other models and spaces another job is writing; bf16 and int8 with their error against fp32.

Run as a script (``python tests/test_store_transform.py [--slow S] [--gloo] ARGS``) it is ``fct-transform ARGS`` with
every block of a shard file written ``S`` seconds apart (so that a test can kill it mid-shard), in a gloo process
group made from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT with ``--gloo``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
SHARD_ROWS = 128  # the digits test split's 540 items: 5 shards, the last one of 28 rows


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    from fct_lightning.commands.fit import fit

    art = tmp_path_factory.mktemp("artifacts")
    for stage in ("old", "side_info", "new"):
        fit(["--stage", stage, "--artifacts", str(art), *TINY, "--model.width", "8"])
    for extra in ([], ["--model.use_side_info", "false"], ["--model.uncertainty", "true"]):
        fit(["--stage", "transformation", "--artifacts", str(art), *TINY, "--model.mixer_width", "64",
             "--model.cache_views", "2", *extra])
    return art / "digits"


@pytest.fixture(scope="module")
def arrays(chain, tmp_path_factory) -> tuple[Path, Path]:
    """The test split embedded by the old and side-info models (fct-embed's .npy files, with their descriptions)."""
    from fct_lightning.gallery.embed import embed

    out = tmp_path_factory.mktemp("arrays")
    return (embed(chain / "old" / "best.ckpt", out / "old.npy", split="test", device="cpu"),
            embed(chain / "side_info" / "best.ckpt", out / "side.npy", split="test", device="cpu"))


@pytest.fixture(scope="module")
def pristine(arrays, tmp_path_factory) -> Path:
    """A store of the test split with spaces old and side_info, in shards of 128 rows (``fct-store import``)."""
    from fct_lightning.gallery.files import read_meta
    from fct_lightning.store import import_arrays

    path = tmp_path_factory.mktemp("pristine") / "store"
    st = import_arrays(path, {"old": arrays[0], "side_info": arrays[1]}, shard_rows=SHARD_ROWS, describe=read_meta)
    assert st.space("old").checkpoint_digest and st.space("side_info").checkpoint_digest  # from fct-embed's .json
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(pristine, path)
    return path


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _start(*args: str, slow: float = 0.0, env: dict[str, str] | None = None, gloo: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    script = [sys.executable, str(Path(__file__)), "--slow", str(slow), *(["--gloo"] if gloo else [])]
    return subprocess.Popen([*script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def _cmd(chain: Path, store: Path, *extra: str, variant: str = "transformation") -> list[str]:
    return ["--checkpoint", str(chain / variant / "best.ckpt"), "--store", str(store), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(chain, pristine, tmp_path_factory) -> dict[str, bytes]:
    """The store's files after one uninterrupted job (a subprocess, as every run compared byte for byte)."""
    path = tmp_path_factory.mktemp("reference") / "store"
    shutil.copytree(pristine, path)
    _finish(_start(*_cmd(chain, path, "--batch_size", "50")))
    return _tree(path)


def _rows(path: Path, space: str) -> np.ndarray:
    from fct_lightning.store import open_store

    st = open_store(path)
    return np.concatenate([st.array(space, i) for i in range(len(st.shards))])


def _gallery_by_hand(chain: Path, variant: str) -> torch.Tensor:
    """h(old(x), side(x)) of the test images through the stage module, as fct-eval computes the gallery."""
    from fct_lightning.data import DATAMODULES
    from fct_lightning.stages import load_stage

    module, _ = load_stage(chain / variant / "best.ckpt", "transformation", ("transformation",))
    with torch.no_grad():
        parts = [(module.gallery_embed(x), idx) for x, _, idx in DATAMODULES["digits"]().eval_dataloader("test")]
    emb = torch.cat([e for e, _ in parts])
    return emb[torch.argsort(torch.cat([i for _, i in parts]))]


def test_transformed_rows_equal_the_evaluated_gallery(chain, store):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.stages import load_h
    from fct_lightning.store import open_store, verify_store

    res = transform_store(chain / "transformation" / "best.ckpt", store, batch_size=50, device="cpu")
    assert (res.space, res.published, res.written, res.rows) == ("fct+side", True, [0, 1, 2, 3, 4], 540)
    np.testing.assert_allclose(_rows(store, "fct+side"), _gallery_by_hand(chain, "transformation").numpy(),
                               rtol=1e-4, atol=1e-5)
    st = open_store(store)
    info = st.space("fct+side")
    _, meta = load_h(chain / "transformation" / "best.ckpt")
    assert info.role == "transformation" and info.dim == 128 and info.dtype == "float32"
    assert info.checkpoint_digest == meta["digest"] and info.provenance["new_digest"] == meta["new_digest"]
    assert info.provenance["precision"] == "fp32" and info.provenance["inputs"]["old"] == st.digest("old")
    assert verify_store(store) == [] and np.array_equal(st.labels(0), open_store(store).labels(0))
    # without side-info: space fct; again: nothing to do, nothing changes
    res = transform_store(chain / "transformation_noside" / "best.ckpt", store, device="cpu")
    assert res.space == "fct" and res.published
    np.testing.assert_allclose(_rows(store, "fct"), _gallery_by_hand(chain, "transformation_noside").numpy(),
                               rtol=1e-4, atol=1e-5)
    before = _tree(store)
    res = transform_store(chain / "transformation_noside" / "best.ckpt", store, device="cpu")
    assert (res.written, res.rows, res.published) == ([], 0, True) and _tree(store) == before


def test_fastfill_writes_the_uncertainty_as_its_own_space(chain, store):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.stages import load_h
    from fct_lightning.store import open_store

    res = transform_store(chain / "fastfill" / "best.ckpt", store, space="ff", dtype="float16", device="cpu")
    assert res.uncertainty_space == "ff-uncertainty"
    h, _ = load_h(chain / "fastfill" / "best.ckpt")
    pred, log_var = h.transform_stored(torch.from_numpy(_rows(store, "old")),
                                       torch.from_numpy(_rows(store, "side_info")), uncertainty=True)
    got = _rows(store, "ff")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), pred.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(_rows(store, "ff-uncertainty")[:, 0], log_var.numpy(), rtol=1e-4, atol=1e-5)
    info = open_store(store).space("ff-uncertainty")
    assert (info.role, info.dim, info.provenance["describes"]) == ("uncertainty", 1, "ff")


def test_killed_mid_shard_and_run_again_gives_the_same_bytes(chain, store, reference):
    progress = store / "fct+side" / ".progress"
    args = _cmd(chain, store, "--batch_size", "50")
    proc = _start(*args, slow=0.02)
    deadline = time.monotonic() + 120
    while not ((progress / "part-00000.json").exists() and (progress / "part-00001.tmp").exists()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job did not get to shard 1 in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (store / "fct+side").glob("*.npy")) == ["part-00000.npy"]
    out = _finish(_start(*args))
    assert "4 of this job's 5 shards written" in out and "published" in out
    assert _tree(store) == reference


def test_two_shard_jobs_give_the_same_bytes_as_one(chain, store, reference):
    """Array-job style, side by side: each job writes its own shards, the one finishing last publishes."""
    from fct_lightning.store import open_store

    procs = [_start(*_cmd(chain, store, "--batch_size", "50", "--shard", f"{k}/2")) for k in range(2)]
    first, second = (_finish(p) for p in procs)
    assert "3 of this job's 3 shards written" in first and "2 of this job's 2 shards written" in second
    assert "; published" in first + second
    assert "fct+side" in open_store(store).spaces and _tree(store) == reference


def test_a_process_group_splits_the_shards_and_rank_0_publishes(chain, store, reference):
    """Two ranks of a gloo group (as under torchrun with an initialised process group): the same bytes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [_start(*_cmd(chain, store, "--batch_size", "50"), env={**env, "RANK": str(r)}, gloo=True)
             for r in range(2)]
    outs = [_finish(p) for p in procs]
    assert "3 of this job's 3 shards written" in outs[0] and "; published" in outs[0]
    assert "2 of this job's 2 shards written" in outs[1] and "not published yet" in outs[1]
    assert _tree(store) == reference


def test_rank_and_world_size_split_the_shards(chain, store, monkeypatch):
    from fct_lightning.gallery.store_transform import transform_store

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = transform_store(chain / "transformation" / "best.ckpt", store, device="cpu")
    assert (res.shards, res.written, res.published) == ([1, 3], [1, 3], False)
    res = transform_store(chain / "transformation" / "best.ckpt", store, device="cpu", shard="0/2")
    assert (res.written, res.published) == ([0, 2, 4], True)


def _store_with(tmp_path: Path, name: str, **spaces: tuple[str, int, str | None]) -> Path:
    """A 300-row store whose spaces are (role, dim, checkpoint digest)."""
    from fct_lightning.store import SpaceSpec, create_store, write_space

    st = create_store(tmp_path / name, [str(k) for k in range(300)], shard_rows=SHARD_ROWS)
    rng = np.random.default_rng(0)
    for space, (role, dim, digest) in spaces.items():
        write_space(st, space, SpaceSpec(role=role, dim=dim, checkpoint_digest=digest),
                    lambda i, dim=dim: rng.standard_normal((st.shards[i].rows, dim), dtype=np.float32))
    return st.path


def test_inputs_from_another_model_are_refused(chain, store, tmp_path):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.stages import load_h

    ckpt = chain / "transformation" / "best.ckpt"
    _, meta = load_h(ckpt)
    good = meta["old_digest"], meta["side_info_digest"]
    cases = {
        "another old model": (dict(old=("old", 128, "sha256:another"), side_info=("side_info", 128, good[1])),
                              r"space 'old' .* was embedded with the old checkpoint of content sha256:another, but h "
                              r".* was trained on another old model .*: embed the gallery with the old checkpoint h "
                              r"was trained on \(fct-embed --checkpoint"),
        "another side-info model": (dict(old=("old", 128, good[0]), side_info=("side_info", 128, "sha256:x")),
                                    "space 'side_info' .* trained on another side_info model"),
        "wrong role": (dict(old=("new", 128, good[0]), side_info=("side_info", 128, good[1])),
                       "space 'old' .* holds 'new' rows, but h's input there must be old-model embeddings"),
        "wrong dimension": (dict(old=("old", 64, good[0]), side_info=("side_info", 128, good[1])),
                            "dimension mismatch: space 'old' .* holds 64-d rows, but h .* takes 128-d"),
        "missing side-info": (dict(old=("old", 128, good[0])),
                              r"has no space 'side_info'; h .* needs the items' side-info features: embed the gallery "
                              r"with the side_info checkpoint"),
    }
    for k, (spaces, message) in enumerate(cases.values()):
        path = _store_with(tmp_path, f"s{k}", **spaces)
        with pytest.raises(ValueError, match=message):
            transform_store(ckpt, path, device="cpu")
        assert not (path / "fct+side").exists()
    with pytest.raises(ValueError, match="--space old is one of h's inputs"):
        transform_store(ckpt, store, space="old", device="cpu")


def test_a_space_another_job_is_writing_is_refused(chain, store):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.store import StoreLocked
    from fct_lightning.store.files import FileLock

    lock = FileLock(store / "fct+side" / ".progress" / "part-00002.lock", "shard part-00002").acquire()
    try:
        with pytest.raises(StoreLocked, match=r"shard part-00002 of space 'fct\+side' in .* is being written by "
                                              "another job"):
            transform_store(chain / "transformation" / "best.ckpt", store, device="cpu")
    finally:
        lock.release()
    assert not list((store / "fct+side").glob("*.npy"))


def test_a_changed_input_shard_is_not_transformed(chain, store):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.store import StoreError, open_store

    shard = store / "side_info" / "part-00002.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"part-00002.npy does not match its sha256 .* nothing of shard part-00002 "
                                         "was transformed"):
        transform_store(chain / "transformation" / "best.ckpt", store, device="cpu", batch_size=50)
    assert sorted(p.name for p in (store / "fct+side").glob("*.npy")) == ["part-00000.npy", "part-00001.npy"]
    assert "fct+side" not in open_store(store).spaces


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precisions_run_and_record_their_error(chain, store, precision, caplog):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.store import open_store

    with caplog.at_level("INFO", logger="fct_lightning.gallery.store_transform"):
        res = transform_store(chain / "transformation" / "best.ckpt", store, space=f"fct-{precision}",
                              precision=precision, device="cpu", batch_size=100)
    assert res.error is not None and 0 < res.error["rel_l2"] < 0.05
    assert f"precision {precision}: max abs error" in caplog.text and "relative L2 error" in caplog.text
    fp32 = _gallery_by_hand(chain, "transformation").numpy()
    got = _rows(store, f"fct-{precision}")
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) < 0.05
    assert open_store(store).space(f"fct-{precision}").provenance["precision"] == precision


def test_fold_batchnorm_is_the_same_function():
    from fct_lightning.gallery.precision import fold_batchnorm
    from fct_lightning.models.transformation import Transformation

    torch.manual_seed(0)
    h = Transformation(16, 8, 12, mixer_width=32)
    with torch.no_grad():  # BN statistics that are not the identity
        for m in h.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    h.eval()
    folded = fold_batchnorm(h)
    x, s = torch.randn(20, 16), torch.randn(20, 12)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    torch.testing.assert_close(folded(x, s), h(x, s), rtol=1e-5, atol=1e-5)


def test_command_line(chain, store, arrays, tmp_path, capsys):
    from tests.commands import transform_main

    h = str(chain / "transformation" / "best.ckpt")
    with pytest.raises(SystemExit, match="give exactly one of --store STORE"):
        transform_main(["--checkpoint", h, "--out", str(tmp_path / "o.npy")])
    with pytest.raises(SystemExit, match="give exactly one of --store"):
        transform_main(["--checkpoint", h, "--store", str(store), "--old", str(arrays[0])])
    with pytest.raises(SystemExit, match="--out belong to the one-file form"):
        transform_main(["--checkpoint", h, "--store", str(store), "--out", str(tmp_path / "o.npy")])
    with pytest.raises(SystemExit, match="--precision work on stores only"):
        transform_main(["--checkpoint", h, "--old", str(arrays[0]), "--out", str(tmp_path / "o.npy"),
                        "--precision", "int8"])
    with pytest.raises(SystemExit, match="--shard '2/2' must be i/n with 0 <= i < n"):
        transform_main(_cmd(chain, store, "--shard", "2/2"))
    with pytest.raises(SystemExit, match="no space 'old'"):
        transform_main(["--checkpoint", h, "--store", str(_store_with(tmp_path, "empty")), "--device", "cpu"])
    assert transform_main(_cmd(chain, store)) == store
    assert "5 of this job's 5 shards written (540 rows" in capsys.readouterr().out
    out = transform_main(["--checkpoint", h, "--old", str(arrays[0]), "--side", str(arrays[1]), "--out",
                          str(tmp_path / "g.npy"), "--device", "cpu"])
    np.testing.assert_allclose(np.load(out), _rows(store, "fct+side"), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    args = sys.argv[1:]
    slow = float(args[1]) if args[:1] == ["--slow"] else 0.0
    args = args[2:] if args[:1] == ["--slow"] else args
    if args[:1] == ["--gloo"]:
        args = args[1:]
        torch.distributed.init_process_group("gloo")
    if slow:
        from fct_lightning.store import files as store_files

        store_files.CHUNK_BYTES = 4096
        plain = store_files.write_block

        def slowly(fh, data):  # noqa: ANN001
            time.sleep(slow)
            plain(fh, data)

        store_files.write_block = slowly
    from fct_lightning.commands.gallery import transform_main

    transform_main(args)
