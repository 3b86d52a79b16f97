"""``fct-store import`` / ``info`` and :func:`import_arrays`: .npy galleries, this project's older single-file
format with its sidecars, and parquet files with a list column."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fct_lightning.commands import run_command
from fct_lightning.commands.store import store_command
from fct_lightning.gallery.files import read_meta
from fct_lightning.store import StoreError, import_arrays, open_store, verify_store
from tests.store.conftest import tree

fct_store = partial(run_command, "fct-store", store_command)
N = 250


def _rows(dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, dim)).astype(np.float32)


def _all(store, space: str) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([store.array(space, i) for i in range(len(store.shards))])


def _legacy(path: Path, rows: np.ndarray, stage: str, ids: list[str] | None = None,
            labels: np.ndarray | None = None) -> Path:
    """An ``x.npy`` as fct-embed wrote it before stores: ``x.json`` and ``x.ids.txt`` or ``x.labels.npy``."""
    np.save(path, rows)
    if ids is not None:
        path.with_suffix(".ids.txt").write_text("".join(json.dumps(i) + "\n" for i in ids))
    if labels is not None:
        np.save(path.with_suffix(".labels.npy"), labels)
    fp = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_suffix(".json").write_text(json.dumps({
        "format": "fct-lightning embeddings", "stage": stage, "dataset": "digits", "checkpoint": "/x/best.ckpt",
        "digest": f"digest-of-{stage}", "embedding_dim": rows.shape[1], "rows": len(rows), "dtype": "float32",
        "fingerprint": fp, "ids": path.with_suffix(".ids.txt").name if ids else None,
        "labels": path.with_suffix(".labels.npy").name if labels is not None else None}))
    return path


def test_import_npy_with_ids_and_labels(tmp_path, capsys):
    old, side = _rows(8, 0), _rows(4, 1).astype(np.float16)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "side.npy", side)
    (tmp_path / "ids.txt").write_text("".join(f"item {k}\n" for k in range(N)))
    np.save(tmp_path / "y.npy", np.arange(N) % 3)
    out = tmp_path / "store"
    argv = ["import", "--out", str(out), "--space", f"old={tmp_path / 'old.npy'}", "--space",
            f"side_info={tmp_path / 'side.npy'}", "--ids", str(tmp_path / "ids.txt"), "--labels",
            str(tmp_path / "y.npy"), "--shard_rows", "100", "--normalized", "side_info"]
    assert fct_store(argv) == 0
    printed = capsys.readouterr().out
    assert "250 items in 3 shard(s) of 100 rows" in printed and "space side_info: role side_info, dim 4, float16" \
        in printed
    store = open_store(out)
    assert store.space("old").dtype == "float32" and store.space("side_info").normalized
    assert np.array_equal(_all(store, "old"), old) and np.array_equal(_all(store, "side_info"), side)
    assert store.ids(2)[:2] == ["item 200", "item 201"] and store.labels(0)[:4].tolist() == [0, 1, 2, 0]
    before = tree(out)
    assert fct_store(argv) == 0  # the same import again: nothing to do, nothing changed
    assert tree(out) == before
    assert fct_store(["verify", str(out)]) == 0
    assert fct_store(["info", str(out)]) == 0 and "space old: role old, dim 8, float32" in capsys.readouterr().out
    with pytest.raises(StoreError, match="other items: row 0 .*'item 0' there and '0' here.*pass --ids"):
        import_arrays(out, {"new": tmp_path / "old.npy"}, shard_rows=100)
    store = import_arrays(out, {"new": tmp_path / "old.npy"}, ids=tmp_path / "ids.txt", shard_rows=100)
    assert set(store.spaces) == {"old", "side_info", "new"}  # a space added to the same items


def test_import_as_float16(tmp_path):
    np.save(tmp_path / "old.npy", _rows(8, 0))
    store = import_arrays(tmp_path / "s", {"old": tmp_path / "old.npy"}, shard_rows=64, dtype="float16")
    assert store.space("old").dtype == "float16"
    assert np.array_equal(_all(store, "old"), _rows(8, 0).astype(np.float16))
    assert store.ids(0)[:3] == ["0", "1", "2"]  # no ids anywhere: the row numbers


def test_import_the_older_single_file_format(tmp_path):
    """fct-store import reads them through the gallery's own reader of that format (commands/store.py)."""
    ids = [f"/images/{k}.png" for k in range(N)]
    old = _legacy(tmp_path / "old.npy", _rows(8, 0), "old", ids=ids)
    side = _legacy(tmp_path / "side.npy", _rows(4, 1), "side_info", ids=ids)
    store = import_arrays(tmp_path / "s", {"old": old, "side_info": side}, shard_rows=100, describe=read_meta)
    assert [i for s in range(3) for i in store.ids(s)] == ids
    assert (store.space("old").role, store.space("old").checkpoint_digest) == ("old", "digest-of-old")
    assert store.space("side_info").provenance["legacy"]["checkpoint"] == "/x/best.ckpt"
    assert store.labels(0) is None and verify_store(store) == []
    split = _legacy(tmp_path / "split.npy", _rows(8, 2), "new", labels=np.arange(N) % 10)
    store = import_arrays(tmp_path / "t", {"new": split}, shard_rows=100, describe=read_meta)
    assert store.labels(1)[:3].tolist() == [0, 1, 2] and store.ids(0)[0] == "0"
    other = _legacy(tmp_path / "other.npy", _rows(4, 3), "side_info", ids=[*ids[:-1], "someone else"])
    with pytest.raises(StoreError, match=r"give different ids: row 249 is '/images/249.png' in the first and "
                                         r"'someone else' in the second"):
        import_arrays(tmp_path / "u", {"old": old, "side_info": other}, describe=read_meta)
    np.save(old, _rows(8, 5))  # changed after its description was written
    with pytest.raises(ValueError, match="old.json does not describe .*old.npy"):
        import_arrays(tmp_path / "v", {"old": old}, describe=read_meta)
    # without a describe function, the store takes the array as it is
    assert import_arrays(tmp_path / "w", {"old": old}).space("old").checkpoint_digest is None


def test_import_a_parquet_list_column(tmp_path):
    rows = _rows(6, 4)
    table = pa.table({"key": [f"k{k}" for k in range(N)], "emb": pa.array(list(rows), pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "emb.parquet", row_group_size=70)
    src = f"{tmp_path / 'emb.parquet'}"
    assert fct_store(["import", "--out", str(tmp_path / "s"), "--space", f"new={src}:emb", "--ids", f"{src}:key",
                      "--shard_rows", "100", "--dtype", "float32"]) == 0
    store = open_store(tmp_path / "s")
    assert np.array_equal(_all(store, "new"), rows) and store.ids(1)[0] == "k100"
    with pytest.raises(StoreError, match="has no column 'nope'"):
        import_arrays(tmp_path / "t", {"new": f"{src}:nope"})


def test_bad_imports(tmp_path, capsys):
    np.save(tmp_path / "a.npy", _rows(8, 0))
    np.save(tmp_path / "b.npy", _rows(8, 0)[:-1])
    with pytest.raises(StoreError, match=r"b.npy has 249 rows but .*a.npy has 250"):
        import_arrays(tmp_path / "s", {"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"})
    (tmp_path / "ids.txt").write_text("x\n" * N)
    with pytest.raises(StoreError, match="id 'x' is given twice, for rows 0 and 1"):
        import_arrays(tmp_path / "s", {"a": tmp_path / "a.npy"}, ids=tmp_path / "ids.txt")
    with pytest.raises(SystemExit, match="fct-store: --space 'old' must be NAME=FILE.npy"):
        fct_store(["import", "--out", str(tmp_path / "s"), "--space", "old"])
    with pytest.raises(SystemExit, match="space name 'a/b' cannot be a store folder"):
        fct_store(["import", "--out", str(tmp_path / "s"), "--space", f"a/b={tmp_path / 'a.npy'}"])
    with pytest.raises(SystemExit, match="there is no store at"):
        fct_store(["info", str(tmp_path / "nothing")])
    assert fct_store(["verify", str(tmp_path / "nothing")]) == 1
    assert "there is no store at" in capsys.readouterr().out
