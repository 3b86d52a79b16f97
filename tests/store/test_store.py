"""The store format: write, read, verify, the ecosystem's reader, and every kind of bad input."""

from __future__ import annotations

import ast
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fct_lightning.store import (
    SpaceSpec,
    SpaceWriter,
    StoreError,
    StoreLocked,
    create_store,
    finalize_space,
    open_store,
    same_items,
    verify_store,
    write_space,
)
from fct_lightning.store import files as store_files
from tests.store import job
from tests.store.conftest import old_rows, tree

SRC = Path(__file__).resolve().parents[2] / "src" / "fct_lightning" / "store"


def test_round_trip(store_path):
    store = open_store(store_path)
    assert (store.rows, store.shard_rows, [s.rows for s in store.shards]) == (530, 100, [100] * 5 + [30])
    assert [s.start for s in store.shards] == [0, 100, 200, 300, 400, 500]
    assert [i for s in range(6) for i in store.ids(s)] == job.items()
    assert np.array_equal(np.concatenate([store.labels(s) for s in range(6)]), np.arange(530) % 5)
    old = store.space("old")
    assert (old.role, old.dim, old.dtype, old.checkpoint_digest, old.normalized) == ("old", 16, "float16",
                                                                                     "sha256:old", False)
    assert old_rows(store).dtype == np.float16
    assert np.array_equal(old_rows(store), job.rows(0, 530).astype(np.float16))
    blocks = list(store.iter_rows("old", 64))
    assert [(s.index, start, len(b)) for s, start, b in blocks][:3] == [(0, 0, 64), (0, 64, 36), (1, 0, 64)]
    assert np.array_equal(np.concatenate([b for _, _, b in blocks]), old_rows(store))
    assert verify_store(store) == []
    assert store.digest() == open_store(store_path).digest() and store.digest().startswith("sha256:")
    assert store.meta(0).column_names == ["id", "label"]
    assert store.shards_for(1, 4) == [1, 5]


def test_a_space_folder_is_what_embedding_reader_reads(store_path):
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(store_path / "old"), file_format="parquet_npy",
                             metadata_folder=str(store_path / "meta"), meta_columns=["id"])
    assert reader.count == 530 and reader.dimension == 16
    embs, ids = [], []
    for emb, meta in reader(batch_size=77, show_progress=False):
        embs.append(emb)
        ids.extend(meta["id"])
    assert ids == job.items()
    assert np.array_equal(np.concatenate(embs), job.rows(0, 530).astype(np.float16))


def test_float32_storage_and_a_second_space(store_path):
    store = open_store(store_path)
    digests = store.digest(), store.digest("old")
    spec = SpaceSpec(role="side_info", dim=3, dtype="float32", normalized=True)
    data = np.random.default_rng(0).standard_normal((530, 3))  # float64 rows: stored as float32
    assert write_space(store, "side_info", spec, lambda i: data[store.shards[i].start:store.shards[i].stop]) == \
        list(range(6))
    store = open_store(store_path)
    assert set(store.spaces) == {"old", "side_info"} and store.space("side_info").normalized
    assert store.digest() != digests[0] and store.digest("old") == digests[1]  # an index of old stays valid
    got = np.concatenate([store.array("side_info", i, mmap=False) for i in range(6)])
    assert got.dtype == np.float32 and np.array_equal(got, data.astype(np.float32))
    assert write_space(store, "side_info", spec, lambda i: 1 / 0) == []  # all verified: nothing recomputed


def test_streaming_writer_takes_rows_in_any_order(store_path, tmp_path):
    store = open_store(store_path)
    order = np.random.default_rng(1).permutation(530)
    with SpaceWriter(store, "copy", job.SPEC) as writer:
        assert writer.pending == list(range(6))
        done = []
        for a in range(0, 530, 37):
            rows = order[a:a + 37]
            done += writer.add(rows, job.rows(0, 530)[rows])
    assert sorted(done) == list(range(6))
    finalize_space(store, "copy")
    for i in range(6):
        assert (store_path / "copy" / f"part-{i:05d}.npy").read_bytes() == \
            (store_path / "old" / f"part-{i:05d}.npy").read_bytes()
    with pytest.raises(StoreError, match="given twice"), SpaceWriter(store, "other", job.SPEC, shards=[0]) as writer:
        writer.add(0, job.rows(0, 10))
        writer.add(5, job.rows(5, 6))
    with pytest.raises(StoreError, match="got 10 of its 100 rows"), SpaceWriter(store, "other", job.SPEC) as writer:
        writer.add(0, job.rows(0, 10))
    with pytest.raises(StoreError, match="does not write"), SpaceWriter(store, "other", job.SPEC, shards=[1]) as writer:
        writer.add(0, job.rows(0, 10))


def test_a_second_writer_of_the_same_shard_is_refused_and_disjoint_ones_are_not(store_path):
    store = open_store(store_path)
    with SpaceWriter(store, "new", job.SPEC, shards=[0, 2]) as first:
        first.add(0, job.rows(0, 10))  # holds shard 0's lock while it fills
        with pytest.raises(StoreLocked, match=r"shard part-00000 of space 'new'.*\"pid\": \d+.*Wait for that job"):
            SpaceWriter(store, "new", job.SPEC)
        with SpaceWriter(store, "new", job.SPEC, shards=[1, 3]) as second:  # disjoint: no wait
            assert second.pending == [1, 3]
        assert first.add(10, job.rows(10, 100)) == [0]
    with SpaceWriter(store, "new", job.SPEC) as third:  # the lock went with the first writer
        assert third.pending == [1, 2, 3, 4, 5]


def test_verify_finds_a_flipped_byte_a_truncated_shard_and_a_damaged_meta_file(store_path, capsys):
    from fct_lightning.commands.store import main

    shard = store_path / "old" / "part-00001.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    last = store_path / "old" / "part-00005.npy"
    last.write_bytes(last.read_bytes()[:-7])
    meta = store_path / "meta" / "part-00002.parquet"
    meta.write_bytes(meta.read_bytes()[:-1] + b"x")
    (store_path / "old" / "stray.npy").write_bytes(b"")
    problems = verify_store(store_path)
    assert any("part-00001.npy does not match its sha256" in p for p in problems)
    assert any("part-00005.npy holds" in p and "truncated" in p for p in problems)
    assert any("meta/part-00002.parquet does not match" in p for p in problems)
    assert any("stray.npy is not part of the store" in p for p in problems)
    with pytest.raises(StoreError, match=r"part-00005.npy cannot be read as a .npy array"):
        open_store(store_path).array("old", 5)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(store_path)])
    assert exit_.value.code == 1
    assert capsys.readouterr().out.count("\n") == len(problems)


def test_a_rerun_repairs_a_damaged_shard(store_path, reference):
    shard = store_path / "old" / "part-00003.npy"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\0\0")
    assert verify_store(store_path)
    assert job.run(str(store_path)) == [3]
    assert verify_store(store_path) == [] and tree(store_path) == reference


def test_a_non_finite_row_is_refused_naming_the_item(tmp_path):
    store = create_store(tmp_path / "s", job.items(), shard_rows=100)

    def produce(i: int) -> np.ndarray:
        rows = job.rows(store.shards[i].start, store.shards[i].stop)
        if i == 2:
            rows[7, 3] = np.nan
        return rows

    with pytest.raises(StoreError, match=r"row 7 of shard part-00002 of space 'old' \(item 'img-0207.jpg'"):
        write_space(store, "old", job.SPEC, produce)
    assert "old" not in open_store(store.path).spaces
    assert sorted(p.name for p in (tmp_path / "s" / "old").iterdir()) == [".progress", "part-00000.npy",
                                                                         "part-00001.npy"]
    big = SpaceSpec(role="old", dim=2, dtype="float16")
    with pytest.raises(StoreError, match="float16's range"):
        write_space(store, "big", big, lambda i: np.full((store.shards[i].rows, 2), 1e6))


def test_a_full_disk_loses_nothing(tmp_path, monkeypatch, reference):
    path = tmp_path / "store"
    calls = []
    plain = store_files.write_block

    def full(fh, data):  # noqa: ANN001
        calls.append(fh.name)
        if calls.count(fh.name) == 3 and fh.name.endswith("part-00002.tmp"):  # the middle of shard 2
            fh.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        plain(fh, data)

    monkeypatch.setattr(store_files, "CHUNK_BYTES", 1600)
    monkeypatch.setattr(store_files, "write_block", full)
    with pytest.raises(StoreError, match=r"disk is full: .*old/part-00002.npy could not be written.*free some space"):
        job.run(str(path))
    assert "old" not in open_store(path).spaces
    assert sorted(p.name for p in (path / "old").iterdir()) == [".progress", "part-00000.npy", "part-00001.npy"]
    assert not list(path.rglob("*.tmp"))
    monkeypatch.setattr(store_files, "write_block", plain)
    assert job.run(str(path)) == [2, 3, 4, 5]
    assert tree(path) == reference


def test_a_full_disk_while_creating_leaves_no_store(tmp_path, monkeypatch):
    from fct_lightning.store import create as create_module

    plain, calls = pq.write_table, []

    def full(table, where):  # noqa: ANN001
        calls.append(where)
        if len(calls) == 3:
            Path(where).write_bytes(b"PAR1")
            raise OSError(errno.ENOSPC, "No space left on device")
        plain(table, where)

    monkeypatch.setattr(create_module.pq, "write_table", full)
    with pytest.raises(StoreError, match="disk is full"):
        create_store(tmp_path / "s", job.items(), shard_rows=100)
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert [p.name for p in (tmp_path / "s" / "meta").iterdir()] == []
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_store(tmp_path / "s")


def test_ids_must_be_unique_and_stores_of_other_items_are_refused(tmp_path, store_path):
    ids = [f"x{k}" for k in range(250)] + ["x17"]
    with pytest.raises(StoreError, match=r"id 'x17' is given twice, for rows 17 and 250"):
        create_store(tmp_path / "dup", ids, shard_rows=100)
    assert not (tmp_path / "dup" / "manifest.json").exists()
    other = job.items()
    other[234] = "changed.jpg"
    with pytest.raises(StoreError, match=r"other items: row 234 \(shard part-00002, row 34\) has id "
                                         r"'img-0234.jpg' there and 'changed.jpg' here"):
        create_store(store_path, other, shard_rows=100)
    assert create_store(store_path, job.items(), shard_rows=100).rows == 530  # the same items: reused
    with pytest.raises(StoreError, match="shard_rows 100"):
        create_store(store_path, job.items(), shard_rows=50)
    b = create_store(tmp_path / "b", other, shard_rows=100)
    with pytest.raises(StoreError, match=r"different items: row 234 is 'img-0234.jpg' in the first and 'changed.jpg'"):
        same_items(open_store(store_path), b)
    same_items(open_store(store_path), create_store(tmp_path / "c", job.items(), shard_rows=100))


def test_manifest_problems(store_path):
    manifest = store_path / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(StoreError, match="format version 99; this fct-lightning reads version 1: install"):
        open_store(store_path)
    manifest.write_text(json.dumps({**data, "rows": 531}))
    with pytest.raises(StoreError, match="not the sum of its shards' rows"):
        open_store(store_path)
    manifest.write_text(json.dumps(data))
    np.save(store_path / "old" / "part-00000.npy", np.zeros((99, 16), np.float16))  # replaced behind its back
    with pytest.raises(StoreError, match=r"part-00000.npy holds a float16 \[99, 16\] array but the manifest says"):
        open_store(store_path).array("old", 0)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_store(store_path / "old")


@pytest.mark.parametrize("name", ["a/b", "../x", "meta", ".hidden", "", "x" * 65, "old.npy"])
def test_a_space_name_must_be_a_plain_folder_name(store_path, name):
    with pytest.raises(StoreError, match="cannot be a store folder"):
        SpaceWriter(store_path, name, job.SPEC)


def test_a_space_of_another_job_needs_overwrite(store_path):
    store = open_store(store_path)
    other = SpaceSpec(role="old", dim=16, dtype="float32")
    with pytest.raises(StoreError, match="made by another job.*pass overwrite"):
        write_space(store, "old", other, lambda i: job.rows(store.shards[i].start, store.shards[i].stop))
    with pytest.raises(StoreError, match=r"must be a float \[100, 16\] array"):
        write_space(store, "old", other, lambda i: job.rows(0, 10), overwrite=True)
    assert "old" not in open_store(store_path).spaces  # unpublished before any shard was replaced
    write_space(store, "old", other, lambda i: job.rows(store.shards[i].start, store.shards[i].stop), overwrite=True)
    assert open_store(store_path).space("old").dtype == "float32" and verify_store(store_path) == []


def test_the_store_package_needs_only_numpy_pyarrow_and_the_standard_library():
    allowed = {"numpy", "pyarrow", "fct_lightning"} | set(sys.stdlib_module_names)
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                assert not name.startswith("fct_lightning.") or name.startswith("fct_lightning.store"), path.name
    code = "import sys, fct_lightning.store; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
