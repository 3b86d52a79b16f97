"""search: the hits file (ids through the store's meta, ranks, distances), streaming over query shards, the
refusal of a stale space or another dim, and search_arrays / RowIds on their own."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fct_lightning.index import HITS_SCHEMA, RowIds, build_index, load_index, search, search_arrays
from tests.index.conftest import DIM, QUERIES, ROWS, all_rows, gallery_rows, write_rows


def _exact(gallery, queries, k):  # noqa: ANN001, ANN202
    flat = faiss.IndexFlatL2(DIM)
    flat.add(all_rows(gallery, "old"))
    return flat.search(all_rows(queries, "new"), k)


def test_hits_file(gallery, queries, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    done = search(tmp_path / "index", gallery, queries, "new", k=7, out=tmp_path / "hits.parquet", batch=40)
    assert done["queries"] == QUERIES and done["hits"] == QUERIES * 7
    hits = pq.read_table(tmp_path / "hits.parquet")
    assert hits.schema == HITS_SCHEMA
    gallery_ids = np.concatenate([gallery.ids(i) for i in range(len(gallery.shards))])
    want_d, want_rows = _exact(gallery, queries, 7)
    assert hits.column("query_id").to_pylist() == [f"q-{q}" for q in range(QUERIES) for _ in range(7)]
    assert hits.column("rank").to_pylist() == list(range(7)) * QUERIES
    assert hits.column("id").to_pylist() == gallery_ids[want_rows.ravel()].tolist()
    np.testing.assert_allclose(hits.column("distance").to_numpy(), want_d.ravel(), rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "gallery", "hits.parquet", "index",
                                                          "queries"]


def test_every_item_finds_itself_by_its_string_id(gallery, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    search(tmp_path / "index", gallery, gallery, "old", k=1, out=tmp_path / "self.parquet", batch=333)
    hits = pq.read_table(tmp_path / "self.parquet")
    assert hits.num_rows == ROWS
    assert hits.column("id").to_pylist() == hits.column("query_id").to_pylist()
    assert len(set(hits.column("id").to_pylist())) == ROWS


def test_fewer_hits_than_k_are_dropped_not_written_as_minus_one(gallery, queries, tmp_path):
    build_index(gallery, "old", "IVF64,Flat", tmp_path / "index")
    search(tmp_path / "index", gallery, queries, "new", k=200, out=tmp_path / "hits.parquet", nprobe=1)
    hits = pq.read_table(tmp_path / "hits.parquet")
    counts = np.unique(hits.column("query_id").to_numpy(zero_copy_only=False), return_counts=True)[1]
    assert hits.column("id").null_count == 0 and counts.min() < 200 and hits.num_rows < QUERIES * 200
    index, _ = load_index(tmp_path / "index")
    _, rows = search_arrays(index, all_rows(queries, "new"), 200, nprobe=1)
    assert hits.num_rows == int((rows >= 0).sum())


def test_stale_space_is_refused(gallery, queries, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    write_rows(gallery, "side_info", gallery_rows(5))  # another space: the index stays valid
    search(tmp_path / "index", gallery.path, queries.path, "new", k=3, out=tmp_path / "a.parquet")
    rewritten = write_rows(gallery, "old", gallery_rows(6), version=2)  # the indexed space re-imported
    np.testing.assert_array_equal(all_rows(rewritten, "old"), gallery_rows(6).astype(np.float16))
    with pytest.raises(ValueError, match="built on another version of space 'old'.*rebuild it: fct-index"):
        search(tmp_path / "index", rewritten, queries, "new", k=3, out=tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="was built on space 'old', which .* does not have"):
        search(tmp_path / "index", queries, queries, "new", k=3, out=tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"query_space": "small"}, "are 8-d but the index .* holds 16-d rows"),
    ({"query_space": "nope"}, "has no space 'nope'"),
    ({"k": 0}, "k 0 must be a positive integer"),
    ({"nprobe": 4}, "nprobe=4 needs an IVF index"),
    ({"batch": -1}, "batch -1 must be"),
])
def test_bad_input(gallery, queries, tmp_path, kwargs, match):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    args = {"query_space": "new", "k": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        search(tmp_path / "index", gallery, queries, out=tmp_path / "hits.parquet", **args)
    assert not (tmp_path / "hits.parquet").exists() and not list(tmp_path.glob(".hits*"))


def test_missing_index_and_existing_output(gallery, queries, tmp_path):
    with pytest.raises(FileNotFoundError, match="there is no index at .*build it with fct-index"):
        search(tmp_path / "index", gallery, queries, "new", k=5, out=tmp_path / "hits.parquet")
    build_index(gallery, "old", "Flat", tmp_path / "index")
    (tmp_path / "hits.parquet").write_bytes(b"keep")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        search(tmp_path / "index", gallery, queries, "new", k=5, out=tmp_path / "hits.parquet")
    assert (tmp_path / "hits.parquet").read_bytes() == b"keep"
    search(tmp_path / "index", gallery, queries, "new", k=5, out=tmp_path / "hits.parquet", overwrite=True)
    assert pq.read_table(tmp_path / "hits.parquet").num_rows == QUERIES * 5


def test_search_arrays_rejects_other_dims(gallery, tmp_path):
    build_index(gallery, "old", "Flat", tmp_path / "index")
    index, _ = load_index(tmp_path / "index")
    with pytest.raises(ValueError, match=r"queries of shape \[3, 8\] do not fit an index of 16-d rows"):
        search_arrays(index, np.zeros((3, 8)), 5)


def test_row_ids_across_shards_with_a_small_cache(gallery):
    ids = np.concatenate([gallery.ids(i) for i in range(len(gallery.shards))])
    rows = np.random.default_rng(0).integers(0, ROWS, 500)
    lookup = RowIds(gallery, cache=2)
    for part in np.array_split(rows, 5):
        assert lookup(part).to_pylist() == ids[part].tolist()
    assert lookup(np.empty(0, dtype=np.int64)).equals(pa.array([], type=pa.string()))
    with pytest.raises(ValueError, match="does not belong to this store"):
        lookup(np.array([ROWS]))
