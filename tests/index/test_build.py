"""build_index: the same index FAISS builds from the same sample, a training sample spread over every shard, ids
that are the store's row numbers, on-disk IVF equal to in-memory, resumption, and refusals."""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pytest

from fct_lightning.index import build as build_module
from fct_lightning.index import (
    build_index,
    default_train_rows,
    load_index,
    make_index,
    search_arrays,
    training_rows,
    training_sample,
)
from tests.index.conftest import DIM, ROWS, SHARD_ROWS, all_rows


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ4x4np"])
def test_same_results_as_faiss_on_the_same_sample(gallery, queries, tmp_path, factory):
    record = build_index(gallery, "old", factory, tmp_path / "index", train_rows=900, seed=3, batch=333)
    rows = np.sort(np.random.default_rng(3).choice(ROWS, 900, replace=False))  # what the docs promise
    data = all_rows(gallery, "old")
    reference = faiss.index_factory(DIM, factory)
    reference.train(data[rows])
    reference.add(data)
    reference.nprobe = 3
    q = all_rows(queries, "new")
    want_d, want_i = reference.search(q, 10)
    index, _ = load_index(tmp_path / "index")
    got_d, got_i = search_arrays(index, q, 10, nprobe=3)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-5)
    assert record["train"] == {"rows": 900, "seed": 3,
                               "sample_sha256": "sha256:" + hashlib.sha256(rows.astype("<i8").tobytes()).hexdigest()}
    exact = faiss.IndexFlatL2(DIM)
    exact.add(data)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_i, exact.search(q, 10)[1], strict=True)])
    assert recall > (0.9 if factory == "IVF8,Flat" else 0.2)  # a usable index, not just an equal one


def test_training_sample_is_uniform_over_all_shards(gallery):
    rows = training_rows(100_000, 5_000, seed=7)
    assert len(np.unique(rows)) == 5_000 and rows.min() >= 0 and rows.max() < 100_000
    counts = np.bincount(rows // 10_000, minlength=10)  # 10 "shards" of 10k rows: 500 each expected
    assert counts.min() > 400 and counts.max() < 600
    assert rows.max() > 90_000 and not np.array_equal(rows, np.arange(5_000))
    np.testing.assert_array_equal(rows, training_rows(100_000, 5_000, seed=7))
    assert not np.array_equal(rows, training_rows(100_000, 5_000, seed=8))
    sample_rows, sample = training_sample(gallery, "old", 600, seed=0)
    assert set(sample_rows // SHARD_ROWS) == set(range(len(gallery.shards)))
    assert sample.dtype == np.float32
    np.testing.assert_array_equal(sample, all_rows(gallery, "old")[sample_rows])


def test_default_train_rows():
    assert default_train_rows(make_index(DIM, "Flat"), 10**7) == 0
    assert default_train_rows(make_index(DIM, "HNSW8"), 10**7) == 0
    assert default_train_rows(make_index(DIM, "IVF8,Flat"), ROWS) == ROWS
    assert default_train_rows(make_index(DIM, "IVF8,Flat"), 10**7) == 65_536
    assert default_train_rows(make_index(DIM, "IVF1024,PQ4"), 10**7) == 262_144
    assert default_train_rows(make_index(DIM, "IVF16384,Flat"), 10**8) == 1 << 21
    assert default_train_rows(make_index(DIM, "IVF65536,Flat"), 10**8) == 39 * 65_536
    assert default_train_rows(make_index(DIM, "PQ4"), 10**7) == 65_536


@pytest.mark.parametrize(("factory", "ids"), [("Flat", "sequential"), ("HNSW16", "sequential"),
                                              ("IVF4,Flat", "add_with_ids"), ("IDMap2,Flat", "add_with_ids")])
def test_ids_are_the_store_row_numbers(gallery, tmp_path, factory, ids):
    record = build_index(gallery, "old", factory, tmp_path / "index", batch=700)
    assert record["ids"] == ids and record["rows"] == ROWS and record["dim"] == DIM
    index, _ = load_index(tmp_path / "index")
    if factory.startswith("HNSW"):
        index.hnsw.efSearch = 256  # (near) exact, so that a miss is a wrong id, not the approximation
    _, rows = search_arrays(index, all_rows(gallery, "old"), 1, nprobe=4 if "IVF" in factory else None)
    np.testing.assert_array_equal(rows[:, 0], np.arange(ROWS))


def test_inner_product_metric(gallery, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index", metric="ip")
    index, record = load_index(tmp_path / "index")
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and record["metric"] == "ip"
    data, q = all_rows(gallery, "old"), all_rows(gallery, "old")[:5]
    d, rows = search_arrays(index, q, 3)
    want = np.argsort(-(q @ data.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(d, np.take_along_axis(q @ data.T, want, 1), rtol=1e-5)


def test_ondisk_ivf_equals_in_memory(gallery, queries, tmp_path):
    mem = build_index(gallery, "old", "IVF8,Flat", tmp_path / "mem", train_rows=1000)
    disk = build_index(gallery, "old", "IVF8,Flat", tmp_path / "disk", train_rows=1000, ondisk=True)
    assert disk["ondisk"] and not mem["ondisk"] and disk["train"] == mem["train"]
    assert (tmp_path / "disk" / "lists.ivfdata").is_file() and not (tmp_path / "disk.partial").exists()
    (tmp_path / "disk").rename(tmp_path / "moved")  # the lists file is found beside the index wherever it goes
    q = all_rows(queries, "new")
    a = search_arrays(load_index(tmp_path / "mem")[0], q, 20, nprobe=3)
    b = search_arrays(load_index(tmp_path / "moved")[0], q, 20, nprobe=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_killed_ondisk_build_resumes_without_retraining(gallery, tmp_path, monkeypatch):
    out = tmp_path / "index"
    real_add, added = build_module._add_rows, []

    def add_then_die(index, store, space, shards, batch):  # noqa: ANN001, ANN202
        if shards == [3] and not added.count("died"):
            added.append("died")
            raise KeyboardInterrupt
        added.append(shards[0])
        return real_add(index, store, space, shards, batch)

    monkeypatch.setattr(build_module, "_add_rows", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(gallery, "old", "IVF8,Flat", out, ondisk=True, seed=5)
    assert not out.exists()  # nothing that looks like an index
    assert sorted(p.name for p in (tmp_path / "index.partial" / "parts").iterdir()) == [
        "part-00000.faiss", "part-00001.faiss", "part-00002.faiss"]

    def no_training(*args):  # noqa: ANN002, ANN202
        raise AssertionError("the trained index of the killed build should be reused")

    monkeypatch.setattr(build_module, "_train", no_training)
    build_index(gallery, "old", "IVF8,Flat", out, ondisk=True, seed=5)
    assert added == [0, 1, 2, "died", 3, 4, 5]
    monkeypatch.undo()
    build_index(gallery, "old", "IVF8,Flat", tmp_path / "clean", ondisk=True, seed=5)
    q = all_rows(gallery, "old")[::7]
    np.testing.assert_array_equal(search_arrays(load_index(out)[0], q, 5, nprobe=2)[1],
                                  search_arrays(load_index(tmp_path / "clean")[0], q, 5, nprobe=2)[1])


def test_failed_rebuild_keeps_the_old_index(gallery, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(gallery, "old", "Flat", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(build_module, "_write_index", lambda index, path: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        build_index(gallery, "old", "IVF4,Flat", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"factory": "IVFx,Flat"}, "FAISS rejects the factory string 'IVFx,Flat'"),
    ({"factory": "PQ5"}, "the PQ size must divide the dim"),
    ({"factory": "HNSW8", "ondisk": True}, "--ondisk needs an IVF index"),
    ({"metric": "cosine"}, "metric 'cosine' is not known"),
    ({"train_rows": ROWS + 1}, f"train_rows {ROWS + 1} must be an integer from 1"),
    ({"train_rows": 0}, "train_rows 0 must be"),
    ({"factory": "IVF64,Flat", "train_rows": 10}, "FAISS cannot train 'IVF64,Flat' on 10 rows"),
    ({"device": "tpu"}, "device 'tpu' is not known"),
    ({"batch": 0}, "batch 0 must be a positive integer"),
    ({"space": "new"}, "has no space 'new'"),
])
def test_bad_input(gallery, tmp_path, kwargs, match):
    args = {"space": "old", "factory": "IVF4,Flat"} | kwargs
    with pytest.raises(ValueError, match=match):
        build_index(gallery, out=tmp_path / "index", **args)
    assert not (tmp_path / "index").exists()


def test_existing_index_needs_overwrite(gallery, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        build_index(gallery, "old", "Flat", tmp_path / "index")
    assert build_index(gallery, "old", "HNSW8", tmp_path / "index", overwrite=True)["index_type"] == "IndexHNSWFlat"
    assert load_index(tmp_path / "index")[1]["factory"] == "HNSW8"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "gallery", "index"]
    with pytest.raises(FileNotFoundError, match="there is no store"):
        build_index(tmp_path / "nowhere", "old", "Flat", tmp_path / "other")
