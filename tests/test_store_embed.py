"""fct-embed --store: several models in one pass on Lightning's predict loop, into a store; resumable after kill -9,
the same bytes from 1 or 2 DDP processes, the same rows as the single-file fct-embed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fct_lightning.commands.fit import fit
from fct_lightning.gallery import embed
from fct_lightning.gallery.items import common_view
from fct_lightning.gallery.store_embed import embed_store
from fct_lightning.store import StoreError, open_store
from tests.commands import embed_main
from tests.data.fakes import make_imagefolder
from tests.stages.test_query_gallery import NET, SMALL

SCRIPT = Path(__file__).parent / "scripts" / "store_embed.py"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_model_summary", "false", "--model.width", "8"]
SHARDS = ["--split", "test", "--shard_rows", "200", "--batch_size", "50"]  # 540 digits: shards of 200, 200, 140


# subprocesses run with OMP_NUM_THREADS=1: in-process runs too, so that bytes can be compared
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    art = tmp_path_factory.mktemp("digits")
    for stage in ("old", "side_info"):
        fit(["--stage", stage, "--artifacts", str(art), *TINY])
    return art / "digits" / "old" / "best.ckpt", art / "digits" / "side_info" / "best.ckpt"


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> Path:
    """The digits test split embedded by old and side_info in one uninterrupted, single-process run."""
    store = tmp_path_factory.mktemp("ref") / "store"
    embed_main(["--checkpoint", str(digits[0]), "--checkpoint", str(digits[1]), "--store", str(store), *SHARDS])
    return store


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of 12 val images and the folder models: old and side_info at 16 px, another side_info at 12 px."""
    base = tmp_path_factory.mktemp("folder")
    root = make_imagefolder(base / "data", 4, {"train": 4, "val": 3}, size=20, ext="jpg+png")
    common = ["--dataset", "folder", "--data.root", str(root), *SMALL, *NET]
    for stage in ("old", "side_info"):
        fit(["--stage", stage, "--artifacts", str(base / "art"), *common])
    fit(["--stage", "side_info", "--artifacts", str(base / "art12"), *common, "--data.image_size", "12"])
    return root, base


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the lock files (emptied when released; a killed job's still names it)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}


def _rows(store: Path, space: str) -> np.ndarray:
    st = open_store(store)
    return np.concatenate([st.array(space, i, mmap=False) for i in range(len(st.shards))])


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FCT_DEBUG="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_store_rows_equal_the_single_file_embed(digits, reference, tmp_path):
    old, side = digits
    st = open_store(reference)
    assert st.rows == 540 and [s.rows for s in st.shards] == [200, 200, 140] and set(st.spaces) == {"old", "side_info"}
    ids = [i for k in range(3) for i in st.ids(k)]
    assert ids == [f"test/{i}" for i in range(540)]
    for ckpt, space in ((old, "old"), (side, "side_info")):
        out = embed(ckpt, tmp_path / f"{space}.npy", split="test")
        np.testing.assert_allclose(_rows(reference, space), np.load(out), rtol=1e-6, atol=1e-6)
        meta = json.loads(out.with_suffix(".json").read_text())
        info = st.space(space)
        assert (info.role, info.dim, info.dtype, info.normalized) == (space, 128, "float32", False)
        assert info.checkpoint_digest == meta["digest"]
        assert info.provenance["source"] == {"dataset": "digits", "split": "test", "image_size": 8}
    labels = np.concatenate([st.labels(k) for k in range(3)])
    np.testing.assert_array_equal(labels, np.load(tmp_path / "old.labels.npy"))
    assert st.manifest["provenance"]["split"] == "test"


def test_two_checkpoints_in_one_pass_equal_two_runs(digits, reference, tmp_path):
    """Two runs of one checkpoint each, into the same store (as for models whose views differ): the same bytes."""
    old, side = digits
    for ckpt in (old, side):
        embed_store([ckpt], tmp_path / "s", split="test", shard_rows=200, batch_size=50)
    assert _files(tmp_path / "s") == _files(reference)
    # float16: the float32 rows rounded to nearest
    embed_store([old], tmp_path / "h", split="test", shard_rows=200, batch_size=50, dtype="float16")
    np.testing.assert_array_equal(_rows(tmp_path / "h", "old"), _rows(reference, "old").astype(np.float16))
    assert open_store(tmp_path / "h").space("old").dtype == "float16"


def test_a_complete_store_is_left_as_it_is(digits, reference):
    """Run again on a complete store: no shard to write (the predict loop has no batches), nothing rewritten."""
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*.npy")}
    manifest = (reference / "manifest.json").read_bytes()
    embed_store(list(digits), reference, split="test", shard_rows=200, batch_size=50)
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*.npy")} == before
    assert (reference / "manifest.json").read_bytes() == manifest


def test_killed_run_resumes_and_gives_the_same_bytes(digits, reference, tmp_path, caplog, capsys):
    store = tmp_path / "store"
    args = ["--checkpoint", str(digits[0]), "--checkpoint", str(digits[1]), "--store", str(store), *SHARDS]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--slow", "0.4", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = [store / space / ".progress" / "part-00000.json" for space in ("old", "side_info")]
    deadline = time.monotonic() + 240
    while not all(p.is_file() for p in first):
        assert proc.poll() is None, f"the job ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the first shard was not recorded in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert not (store / "manifest.json").read_text().count('"old": {')  # no space published
    assert not (store / "old" / ".progress" / "part-00002.json").exists()  # killed mid-run
    kept = {space: (store / space / "part-00000.npy").stat().st_ino for space in ("old", "side_info")}
    with caplog.at_level(logging.INFO, logger="fct_lightning"):
        embed_main(args)  # the same command again
    assert "1 of 3 shards are complete and checked, 2 to write" in caplog.text
    assert {space: (store / space / "part-00000.npy").stat().st_ino for space in kept} == kept  # not rewritten
    assert _files(store) == _files(reference)
    assert f"store {store}: 540 items in 3 shards; spaces old (128-d float32), side_info (128-d float32)" in \
        capsys.readouterr().out


@pytest.mark.ddp
def test_two_ddp_processes_write_the_same_bytes_as_one(digits, reference, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, str(SCRIPT), "--checkpoint", str(digits[0]), "--checkpoint", str(digits[1]), "--store",
           str(store), *SHARDS, "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 0 of 2: 2 shard(s)" in proc.stderr and "rank 1 of 2: 1 shard(s)" in proc.stderr
    assert proc.stdout.count("540 items in 3 shards") == 1  # rank 0 reports
    assert _files(store) == _files(reference)


@pytest.mark.slow
@pytest.mark.ddp
def test_under_torchrun_with_a_rank_that_has_no_shard(digits, tmp_path):
    """The processes started by torchrun (as on a cluster: Lightning only joins them); one shard for two ranks, so
    rank 1 has no batch at all (Lightning's predict loop then skips it) and must still meet rank 0 at the end."""
    one = embed_store(list(digits), tmp_path / "one", split="test", shard_rows=1000, batch_size=50)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--checkpoint", str(digits[0]), "--checkpoint", str(digits[1]), "--store", str(store), "--split", "test",
           "--shard_rows", "1000", "--batch_size", "50", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 1 of 2: 0 shard(s)" in proc.stderr
    assert _files(store) == _files(one)


def test_a_rank_without_shards_may_have_an_empty_loader(digits, tmp_path):
    """Lightning refuses a zero-length loader on one rank of several unless the datamodule allows it (an instance
    attribute that LightningDataModule.__init__ resets: a class attribute would not do)."""
    from fct_lightning.gallery.store_embed import EmbedData, load_models

    _, items = load_models([digits[0]], None, "test", None)
    assert EmbedData(items, tmp_path / "s", None).allow_zero_length_dataloader_with_multiple_devices is True


def test_a_folder_of_images_equals_the_single_file_embed(folder, tmp_path):
    root, base = folder
    old, side = base / "art" / "folder" / "old" / "best.ckpt", base / "art" / "folder" / "side_info" / "best.ckpt"
    store = embed_store([old, side], tmp_path / "store", images=root / "val", shard_rows=5)
    st = open_store(store)
    assert [s.rows for s in st.shards] == [5, 5, 2] and st.labels(0) is None
    for ckpt, space in ((old, "old"), (side, "side_info")):
        out = embed(ckpt, tmp_path / f"{space}.npy", images=root / "val")
        np.testing.assert_allclose(_rows(store, space), np.load(out), rtol=1e-5, atol=1e-6)
    ids = [json.loads(line) for line in (tmp_path / "old.ids.txt").read_text().splitlines()]
    assert [i for k in range(3) for i in st.ids(k)] == ids
    assert st.manifest["provenance"]["unreadable"] == [] and st.space("old").provenance["source"]["image_size"] == 16
    # a model reading 12 px images cannot share the pass
    side12 = base / "art12" / "folder" / "side_info" / "best.ckpt"
    with pytest.raises(ValueError, match=r"read the images differently .*16 px.*12 px.*same --store"):
        embed_store([old, side12], tmp_path / "other", images=root / "val")
    assert not (tmp_path / "other").exists()


def test_unreadable_files_stop_the_job_or_are_left_out(folder, tmp_path):
    root, base = folder
    old = base / "art" / "folder" / "old" / "best.ckpt"
    gallery = tmp_path / "gallery"
    shutil.copytree(root / "val", gallery)
    broken = sorted((gallery / "class_001").iterdir())[1]
    broken.write_bytes(b"broken")
    with pytest.raises(ValueError, match=rf"1 of the 12 image files .*{broken.name}.*nothing was written.*--skip_unr"):
        embed_store([old], tmp_path / "store", images=gallery, shard_rows=5)
    assert not (tmp_path / "store").exists()
    store = embed_store([old], tmp_path / "store", images=gallery, shard_rows=5, skip_unreadable=True)
    st = open_store(store)
    assert st.rows == 11 and st.manifest["provenance"]["unreadable"] == [f"class_001/{broken.name}"]
    whole = embed_store([old], tmp_path / "whole", images=root / "val", shard_rows=5)
    all_ids = [i for k in range(3) for i in open_store(whole).ids(k)]
    keep = [all_ids.index(i) for k in range(3) for i in st.ids(k)]
    np.testing.assert_allclose(_rows(store, "old"), _rows(whole, "old")[keep], rtol=1e-6, atol=1e-6)
    embed_store([old], store, images=gallery, shard_rows=5, skip_unreadable=True)  # resumes: the same items
    with pytest.raises(ValueError, match="was created with --skip_unreadable, which left out 1 file"):
        embed_store([old], store, images=gallery, shard_rows=5)


def test_bad_input_is_refused(digits, reference, tmp_path):
    old, side = digits
    with pytest.raises(ValueError, match="are both 'old' checkpoints"):
        embed_store([old, old], tmp_path / "a", split="test")
    with pytest.raises(ValueError, match="not both"):
        embed_store([old], tmp_path / "a", split="test", images=tmp_path)
    with pytest.raises(ValueError, match="--skip_unreadable applies to --images"):
        embed_store([old], tmp_path / "a", split="test", skip_unreadable=True)
    with pytest.raises(ValueError, match="--dtype 'bfloat16' is not stored"):
        embed_store([old], tmp_path / "a", dtype="bfloat16")
    with pytest.raises(ValueError, match="split='nope' is not a split of digits"):
        embed_store([old], tmp_path / "a", split="nope")
    with pytest.raises(StoreError, match="already exists with shard_rows 200, not 100"):
        embed_store([old], reference, split="test", shard_rows=100)
    with pytest.raises(StoreError, match="already exists for other items"):
        embed_store([old], reference, split="train", shard_rows=200)
    assert not (tmp_path / "a").exists()
    for argv, message in (
        (["--checkpoint", str(old), "--checkpoint", str(side), "--out", "x.npy"], "use --store to embed several"),
        (["--checkpoint", str(old), "--out", "x.npy", "--trainer.devices", "2"], "--trainer.devices work with --store"),
        (["--checkpoint", str(old), "--store", "s", "--device", "cpu"], "--device cpu is for --out"),
    ):
        with pytest.raises(SystemExit, match=message):
            embed_main(argv)


def test_views_must_agree():
    a = ({"family": "folder", "image_size": 16}, "folder images at 16 px")
    common_view({"a.ckpt": a, "b.ckpt": a})
    with pytest.raises(ValueError, match="a.ckpt: folder images at 16 px; b.ckpt: folder images at 32 px"):
        common_view({"a.ckpt": a, "b.ckpt": ({"family": "folder", "image_size": 32}, "folder images at 32 px")})


def test_the_held_out_split_of_the_checkpoints_run_is_embedded(digits, tmp_path):
    # fct-embed rebuilt the datamodule without the run's val_fraction: 'holdout' was "not a split of digits" and
    # 'train' embedded every training image, the held-out ones too, so h from stores could not be validated on
    # the items the image stages selected their checkpoints on
    from fct_lightning.data import DATAMODULES

    dm = DATAMODULES["digits"](val_fraction=0.1)  # configs/digits/data.yaml's, with which the fixture trained
    for split in ("holdout", "train"):
        embed_store([digits[0]], tmp_path / split, split=split, shard_rows=200)
        st = open_store(tmp_path / split)
        assert st.rows == len(dm.dataset(split).targets)
        assert st.space("old").provenance["source"]["val_fraction"] == 0.1
        labels = np.concatenate([st.labels(i) for i in range(len(st.shards))])
        assert np.array_equal(labels, np.asarray(dm.dataset(split).targets))
