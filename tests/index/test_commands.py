"""fct-index and fct-search end to end, and their one-line errors (exit 1, nothing written)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.commands import index_main as fct_index
from tests.commands import search_main as fct_search
from tests.index.conftest import QUERIES, gallery_rows, write_rows


def _fails(main, argv, match):  # noqa: ANN001, ANN202
    with pytest.raises(SystemExit) as err:
        main(argv)
    message = str(err.value.code)
    assert message.count("\n") == 1 and "FCT_DEBUG" in message.splitlines()[1]
    assert match in message.splitlines()[0], message
    return message


def test_index_then_search(gallery, queries, tmp_path, capsys):
    out = tmp_path / "index"
    assert fct_index(["--store", str(gallery.path), "--space", "old", "--factory", "IVF8,Flat", "--out", str(out),
                      "--train_rows", "1200", "--seed", "4", "--ondisk"]) == 0
    assert "IndexIVFFlat (IVF8,Flat, l2) of 2,600 rows of space old (16-d), trained on 1,200 random rows, on disk" \
        in capsys.readouterr().out
    record = json.loads((out / "index.json").read_text())
    assert record["store_digest"] == gallery.digest("old") and record["train"]["seed"] == 4
    hits = tmp_path / "hits.parquet"
    assert fct_search(["--index", str(out), "--store", str(gallery.path), "--queries", str(queries.path),
                       "--space", "new", "-k", "4", "--nprobe", "8", "--out", str(hits)]) == 0
    assert f"{QUERIES * 4:,} hits for {QUERIES:,} queries" in capsys.readouterr().out
    assert pq.read_table(hits).column("rank").to_pylist() == [0, 1, 2, 3] * QUERIES
    # the HNSW index (its store row ids in an id map) searched with a wider efSearch finds more of the exact
    # neighbours of the Flat index
    exact, hnsw = tmp_path / "flat", tmp_path / "hnsw"
    for factory, folder in (("Flat", exact), ("HNSW4", hnsw)):
        fct_index(["--store", str(gallery.path), "--space", "old", "--factory", factory, "--out", str(folder)])
    got = {}
    for name, folder, extra in (("flat", exact, []), ("narrow", hnsw, ["--search_params", "efSearch=1"]),
                                ("wide", hnsw, ["--search_params", "efSearch=512"])):
        fct_search(["--index", str(folder), "--store", str(gallery.path), "--queries", str(queries.path),
                    "--space", "new", "-k", "5", "--out", str(tmp_path / f"{name}.parquet"), *extra])
        got[name] = pq.read_table(tmp_path / f"{name}.parquet").column("id").to_pylist()
    recall = {name: sum(len(set(got[name][i:i + 5]) & set(got["flat"][i:i + 5]))
                        for i in range(0, len(got["flat"]), 5)) / len(got["flat"]) for name in ("narrow", "wide")}
    assert recall["narrow"] < recall["wide"] and recall["wide"] > 0.95, recall


def test_errors_are_one_line_and_write_nothing(gallery, queries, tmp_path):
    out, hits = tmp_path / "index", tmp_path / "hits.parquet"
    base = ["--store", str(gallery.path), "--out", str(out)]
    _fails(fct_index, [*base, "--space", "new", "--factory", "Flat"], "has no space 'new'")
    _fails(fct_index, [*base, "--space", "old", "--factory", "IVF8,Zip"], "FAISS rejects the factory string")
    _fails(fct_index, [*base, "--space", "old", "--factory", "HNSW8", "--ondisk"], "--ondisk needs an IVF index")
    assert not out.exists() and not (tmp_path / "index.partial").exists()
    fct_index([*base, "--space", "old", "--factory", "Flat"])
    _fails(fct_index, [*base, "--space", "old", "--factory", "Flat"], "already exists; pass --overwrite")
    search = ["--index", str(out), "--store", str(gallery.path), "--queries", str(queries.path), "--out", str(hits)]
    _fails(fct_search, [*search, "--space", "new", "-k", "0"], "k 0 must be a positive integer")
    _fails(fct_search, [*search, "--space", "new", "--search_params", "efSearch"], "'efSearch' is not NAME=NUMBER")
    _fails(fct_search, [*search, "--space", "small"], "are 8-d but the index")
    write_rows(gallery, "old", gallery_rows(9), version=2)
    _fails(fct_search, [*search, "--space", "new"], "built on another version of space 'old'")
    assert not hits.exists()
    fct_index([*base, "--space", "old", "--factory", "Flat", "--overwrite"])
    fct_search([*search, "--space", "new", "-k", "2"])
    _fails(fct_search, [*search, "--space", "new"], "already exists; pass --overwrite")
