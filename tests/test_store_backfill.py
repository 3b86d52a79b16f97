"""fct-backfill on stores: a round changes exactly the chosen rows (by id; the rest bit-identical to the input
space, which is never modified), later rounds never re-choose backfilled rows, the orders are fct-eval's, kill -9 and
a rerun give the same bytes, a live FAISS index follows the round; wrong inputs end in one clear message. Row columns
of the store package, which carry the per-row provenance, are tested here too."""

from __future__ import annotations

import json
import os
import re
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
SCRIPT = Path(__file__).parent / "scripts" / "store_backfill.py"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
SHARD_ROWS = 128  # the digits test split's 540 items: 5 shards, the last one of 28 rows
N = 540


# subprocesses run with OMP_NUM_THREADS=1: in-process runs too, so that bytes can be compared
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """old, side_info, new, a FastFill h (``fastfill``) and a plain h (``transformation``) on digits."""
    from fct_lightning.commands.fit import fit

    art = tmp_path_factory.mktemp("artifacts")
    for stage in ("old", "side_info", "new"):
        fit(["--stage", stage, "--artifacts", str(art), *TINY, "--model.width", "8"])
    for extra in (["--model.uncertainty", "true"], []):
        fit(["--stage", "transformation", "--artifacts", str(art), *TINY, "--model.mixer_width", "32",
             "--model.cache_views", "1", *extra])
    return art / "digits"


@pytest.fixture(scope="module")
def pristine(chain, tmp_path_factory) -> Path:
    """The test split embedded into a store (old, side_info) and transformed by the FastFill h (fct+side and
    fct+side-uncertainty), as in production."""
    from fct_lightning.gallery.store_embed import embed_store
    from fct_lightning.gallery.store_transform import transform_store

    path = tmp_path_factory.mktemp("pristine") / "store"
    embed_store([chain / "old" / "best.ckpt", chain / "side_info" / "best.ckpt"], path, split="test",
                shard_rows=SHARD_ROWS, batch_size=100, trainer={"accelerator": "cpu", "devices": 1})
    res = transform_store(chain / "fastfill" / "best.ckpt", path, device="cpu")
    assert res.uncertainty_space == "fct+side-uncertainty" and res.published
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(pristine, path)
    return path


@pytest.fixture(scope="module")
def new_rows(chain, tmp_path_factory) -> np.ndarray:
    """The new model's embeddings of the test split, by the single-file fct-embed (split order = store order)."""
    from fct_lightning.gallery.embed import embed

    return np.load(embed(chain / "new" / "best.ckpt", tmp_path_factory.mktemp("new") / "new.npy", split="test",
                         device="cpu"))


def _rows(path: Path, space: str) -> np.ndarray:
    from fct_lightning.store import open_store

    st = open_store(path)
    return np.concatenate([st.array(space, i, mmap=False) for i in range(len(st.shards))])


def _ids(path: Path) -> np.ndarray:
    from fct_lightning.store import open_store

    st = open_store(path)
    return np.array([x for i in range(len(st.shards)) for x in st.ids(i)])


def _tree(path: Path, under: str = "") -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted((path / under).rglob("*")) if p.is_file()}


def _args(chain: Path, store: Path, *extra: str, h: str = "fastfill", new: str = "new") -> list[str]:
    return ["--store", str(store), "--h", str(chain / h / "best.ckpt"), "--checkpoint",
            str(chain / new / "best.ckpt"), "--device", "cpu", "--batch_size", "16", *extra]


def _run(*args: str) -> Path:
    from tests.commands import backfill_main

    return backfill_main(list(args))


def test_a_round_changes_exactly_the_chosen_rows(chain, store, new_rows):
    from embedding_reader import EmbeddingReader

    from fct_lightning.gallery.store_backfill import backfill_store
    from fct_lightning.store import open_store, read_source, verify_store

    before = _tree(store, "fct+side")
    entry = json.loads((store / "manifest.json").read_text())["spaces"]["fct+side"]
    res = backfill_store(store, chain / "fastfill" / "best.ckpt", chain / "new" / "best.ckpt", "uncertainty", 0.1,
                         device="cpu", batch_size=16)
    assert (res.space, res.round, res.published, res.backfilled, len(res.chosen)) == ("fct+side-bf1", 1, True, 54, 54)
    unc = _rows(store, "fct+side-uncertainty")[:, 0]
    assert np.array_equal(res.chosen, np.sort(np.argsort(-unc, kind="stable")[:54]))  # the most uncertain
    assert unc[res.chosen].min() >= np.delete(unc, res.chosen).max()
    st = open_store(store)
    source = read_source(st, "fct+side-bf1")
    ids = _ids(store)
    assert set(ids[source == 1]) == {f"test/{r}" for r in res.chosen} and set(np.unique(source)) == {0, 1}
    out, inp = _rows(store, "fct+side-bf1"), _rows(store, "fct+side")
    rest = source == 0
    assert out[rest].tobytes() == inp[rest].tobytes()  # bit-identical
    np.testing.assert_allclose(out[~rest], new_rows[~rest], rtol=1e-5, atol=1e-6)
    assert not np.allclose(inp[~rest], new_rows[~rest], atol=1e-3)  # they did change
    # the input space: the same files, the same manifest entry
    assert _tree(store, "fct+side") == before
    assert json.loads((store / "manifest.json").read_text())["spaces"]["fct+side"] == entry
    info = st.space("fct+side-bf1")
    prov = info.provenance
    assert (info.role, info.columns, prov["round"], prov["policy"], prov["fraction"]) == (
        "backfill", {"source": "int16"}, 1, "uncertainty", 0.1)
    assert prov["new_digest"] == json.loads((store / "manifest.json").read_text())["spaces"]["fct+side"][
        "provenance"]["new_digest"] and prov["inputs"]["fct+side"] == st.digest("fct+side")
    assert verify_store(store) == []
    # embedding-reader reads the new space's folder as it reads any space
    assert sorted(p.name for p in (store / "fct+side-bf1").iterdir() if not p.name.startswith(".")) == [
        f"part-{k:05d}.npy" for k in range(5)]
    reader = EmbeddingReader(str(store / "fct+side-bf1"), file_format="parquet_npy",
                             metadata_folder=str(store / "meta"), meta_columns=["id"])
    got = {i: e for emb, meta in reader(batch_size=1000, start=0, end=reader.count, show_progress=False)
           for i, e in zip(meta["id"], emb, strict=True)}
    np.testing.assert_array_equal(np.stack([got[i] for i in ids]), out)
    # the same command again: nothing to do, nothing changes
    tree = _tree(store)
    res = backfill_store(store, chain / "fastfill" / "best.ckpt", chain / "new" / "best.ckpt", "uncertainty", 0.1,
                         device="cpu", batch_size=16)
    assert (res.written, res.embedded) == ([], 0) and _tree(store) == tree


def test_round_two_adds_rows_and_never_re_chooses(chain, store):
    from fct_lightning.gallery.store_backfill import backfill_order
    from fct_lightning.store import open_store, read_source

    _run(*_args(chain, store, "--policy", "random", "--fraction", "0.1", "--seed", "3"))
    out = _run(*_args(chain, store, "--policy", "random", "--fraction", "0.2", "--seed", "3", "--space",
                      "fct+side-bf1"))
    st = open_store(out)
    first, second = read_source(st, "fct+side-bf1"), read_source(st, "fct+side-bf2")
    order = backfill_order("random", N, 3)
    assert set(np.flatnonzero(first)) == set(order[:54])
    assert set(np.flatnonzero(second == 1)) == set(np.flatnonzero(first))  # kept, with their round
    assert set(np.flatnonzero(second == 2)) == set(order[54:108])  # the next 10% of the same order
    a, b = _rows(out, "fct+side-bf1"), _rows(out, "fct+side-bf2")
    assert a[second != 2].tobytes() == b[second != 2].tobytes()
    assert st.space("fct+side-bf2").provenance["base"] == "fct+side"
    # asking for no more than is backfilled already: refused
    with pytest.raises(SystemExit, match=r"--fraction 0.15 means 81 of the 540 rows backfilled, but 108 already are "
                                         r"\(space 'fct\+side-bf2', rounds 1 to 2\); pass a fraction above 0.2"):
        _run(*_args(chain, store, "--policy", "random", "--fraction", "0.15", "--space", "fct+side-bf2"))


def test_orders_are_fct_evals():
    """The orders are those of fct_lightning.backfill's policies (fct-eval's curves): uncertainty highest first,
    ties by row; random = the seeded permutation."""
    from fct_lightning.backfill import BackfillContext, get_policy
    from fct_lightning.gallery.store_backfill import backfill_order, choose_rows

    unc = np.array([0.5, 2.0, 0.5, -1.0, 2.0, 0.5, 3.0], np.float32)
    ctx = BackfillContext(torch.zeros(7, 2), torch.zeros(7, 2), torch.zeros(7, dtype=torch.long),
                          torch.from_numpy(unc))
    assert backfill_order("uncertainty", 7, uncertainty=unc).tolist() == [6, 1, 4, 0, 2, 5, 3]
    assert (backfill_order("uncertainty", 7, uncertainty=unc).tolist()
            == get_policy("uncertainty").order(ctx, 0).tolist())
    # confident: lowest first, ties still by row (not the reversed uncertainty order, which would reverse them too)
    assert backfill_order("confident", 7, uncertainty=unc).tolist() == [3, 0, 2, 5, 1, 4, 6]
    assert (backfill_order("confident", 7, uncertainty=unc).tolist()
            == get_policy("confident").order(ctx, 0).tolist())
    for seed in (0, 5):
        assert backfill_order("random", 7, seed).tolist() == get_policy("random").order(ctx, seed).tolist()
    source = np.array([0, 1, 0, 0, 0, 0, 2], np.int16)  # rows 1 and 6 backfilled before
    assert choose_rows(backfill_order("uncertainty", 7, uncertainty=unc), source, 4).tolist() == [0, 4]
    with pytest.raises(ValueError, match="5 more rows are needed to reach 7 backfilled rows, but the order offers "
                                         "only 3"):
        choose_rows(np.array([0, 2, 3]), source, 7)


def test_uncertainty_is_computed_with_h_when_its_space_is_missing(chain, store):
    from fct_lightning.gallery.store_backfill import backfill_store

    manifest = json.loads((store / "manifest.json").read_text())
    unc = _rows(store, "fct+side-uncertainty")[:, 0]
    del manifest["spaces"]["fct+side-uncertainty"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    res = backfill_store(store, chain / "fastfill" / "best.ckpt", chain / "new" / "best.ckpt", "uncertainty", 0.05,
                         device="cpu")
    assert np.array_equal(res.chosen, np.sort(np.argsort(-unc, kind="stable")[:27]))
    assert "uncertainty" in json.loads((store / "manifest.json").read_text())["spaces"]["fct+side-bf1"][
        "provenance"] and res.backfilled == 27


def test_list_policy(chain, store, tmp_path):
    from fct_lightning.store import open_store, read_source

    listed = tmp_path / "ids.txt"
    listed.write_text("test/7\ntest/300\ntest/3\ntest/539\n")
    out = _run(*_args(chain, store, "--policy", "list", "--list", str(listed), "--out_space", "mine"))
    source = read_source(open_store(out), "mine")
    assert np.flatnonzero(source).tolist() == [3, 7, 300, 539]
    # with --fraction: the first listed ones not backfilled yet, up to the cumulative target
    listed.write_text("test/7\ntest/11\ntest/12\ntest/13\ntest/14\ntest/15\n")
    _run(*_args(chain, store, "--policy", "list", "--list", str(listed), "--space", "mine", "--fraction", "0.01"))
    assert np.flatnonzero(read_source(open_store(out), "fct+side-bf2") == 2).tolist() == [11]  # 0.01 * 540 -> 5
    listed.write_text("test/7\nnot-an-item\ntest/1\nalso-not\n")
    with pytest.raises(SystemExit, match=r"^fct-backfill: --list .*ids.txt: 2 of its 4 ids are not items of .*, the "
                                         r"first 'not-an-item' \(entry 2\)"):
        _run(*_args(chain, store, "--policy", "list", "--list", str(listed)))
    listed.write_text("test/7\ntest/1\ntest/7\n")
    with pytest.raises(SystemExit, match=r"id 'test/7' is listed twice \(entries 1 and 3\)"):
        _run(*_args(chain, store, "--policy", "list", "--list", str(listed)))


def test_wrong_inputs_are_refused_with_one_message(chain, store):
    from fct_lightning.gallery.store_transform import transform_store

    cases = [
        (_args(chain, store, "--policy", "random", "--fraction", "0"),
         r"--fraction 0.0 must be a number in \(0, 1\]"),
        (_args(chain, store, "--policy", "random", "--fraction", "1.5"),
         r"--fraction 1.5 must be a number in \(0, 1\]"),
        (_args(chain, store, "--policy", "random"), "--policy random needs --fraction F in"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", "--list", "x.txt"),
         "--list FILE goes with --policy list"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", new="old"),
         r"--checkpoint .*old/best.ckpt is a 'old' checkpoint of content \w+, but h .* was trained toward the new "
         r"model of content \w+; .*pass its checkpoint"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", h="transformation"),
         r"space 'fct\+side' of .* was made by the transformation of content \w+, not by h .*; transform the gallery "
         r"with this h first \(fct-transform --checkpoint"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", "--space", "old"),
         "space 'old' of .* holds 'old' rows, not h's transformed gallery"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", "--out_space", "fct+side"),
         "--out_space fct\\+side would replace an input"),
        (_args(chain, store, "--policy", "random", "--fraction", ".1", "--split", "train"),
         r"row 0 of .* has id 'test/0', not 'train/<index>': the store does not hold items of split 'train'"),
    ]
    tree = _tree(store)
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            _run(*args)
        text = str(info.value)
        assert text.startswith("fct-backfill: ") and len(text.splitlines()) == 2, text
        assert re.search(message, text), (message, text)
    assert _tree(store) == tree  # nothing was written
    transform_store(chain / "transformation" / "best.ckpt", store, space="plain", device="cpu")
    with pytest.raises(SystemExit, match="--policy uncertainty/confident needs FastFill's per-item uncertainty, "
                                         "but h .* has no uncertainty head"):
        _run(*_args(chain, store, "--policy", "uncertainty", "--fraction", ".1", "--space", "plain",
                    h="transformation"))


def _start(*args: str, slow: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *(["--slow", str(slow)] if slow else []), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_killed_mid_shard_and_run_again_gives_the_same_bytes(chain, pristine, store, tmp_path):
    ref = tmp_path / "reference"
    shutil.copytree(pristine, ref)
    args = ("--policy", "random", "--fraction", "0.3", "--seed", "1")
    _finish(_start(*_args(chain, ref, *args)))
    progress = store / "fct+side-bf1" / ".progress"
    proc = _start(*_args(chain, store, *args), slow=0.02)
    deadline = time.monotonic() + 120
    while not ((progress / "part-00000.json").exists() and (progress / "part-00001.tmp").exists()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job did not get to shard 1 in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (store / "fct+side-bf1").glob("*.npy")) == ["part-00000.npy"]
    assert "fct+side-bf1" not in json.loads((store / "manifest.json").read_text())["spaces"]
    out = _finish(_start(*_args(chain, store, *args)))
    assert "4 of this job's 5 shards written" in out and "; published" in out
    assert _tree(store) == _tree(ref)


def test_a_live_index_follows_the_round(chain, store):
    import faiss

    from fct_lightning.gallery.store_backfill import backfill_store
    from fct_lightning.index import rows_of_rounds, search_with_delta, update_index
    from fct_lightning.store import open_store

    before = _rows(store, "fct+side")
    rows = np.arange(N, dtype=np.int64)
    live = faiss.IndexIDMap2(faiss.IndexFlatL2(before.shape[1]))
    live.add_with_ids(before, rows)
    res = backfill_store(store, chain / "fastfill" / "best.ckpt", chain / "new" / "best.ckpt", "random", 0.25,
                         seed=2, device="cpu")
    assert update_index(live, store, "fct+side-bf1") == len(res.chosen) == 135 and live.ntotal == N
    after = _rows(store, "fct+side-bf1")
    fresh = faiss.IndexIDMap2(faiss.IndexFlatL2(after.shape[1]))
    fresh.add_with_ids(after, rows)
    # queries near gallery rows: random ones far from every row are nearly equidistant from all of them, and exact
    # distance ties at the k-th place may then order differently in two indexes
    rng = np.random.default_rng(0)
    queries = (after[rng.choice(N, 40, replace=False)]
               + 0.1 * after.std() * rng.standard_normal((40, after.shape[1]))).astype(np.float32)
    d1, i1 = live.search(queries, 10)
    d2, i2 = fresh.search(queries, 10)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2, rtol=1e-5)
    for r in res.chosen[:5]:
        assert np.array_equal(live.reconstruct(int(r)), after[r])
    # an index that takes no adds (IVF; on disk in production): a delta index of the backfilled rows, merged
    ivf = faiss.index_factory(after.shape[1], "IVF4,Flat")
    ivf.train(before)
    ivf.add_with_ids(before, rows)
    faiss.extract_index_ivf(ivf).nprobe = 4  # every list: exact, comparable with the flat index
    replaced = rows_of_rounds(open_store(store), "fct+side-bf1")
    delta = faiss.IndexIDMap2(faiss.IndexFlatL2(after.shape[1]))
    delta.add_with_ids(after[replaced], replaced)
    d3, i3 = search_with_delta(ivf, delta, replaced, queries, 10)
    assert np.array_equal(i3, i2) and np.allclose(d3, d2, rtol=1e-5)


def test_row_columns_in_the_store(tmp_path):
    import pyarrow.parquet as pq

    from fct_lightning.store import SpaceSpec, SpaceWriter, StoreError, create_store, open_store, verify_store

    st = create_store(tmp_path / "s", [f"i{k}" for k in range(10)], shard_rows=4)
    spec = SpaceSpec(role="backfill", dim=2, columns={"source": "int16"})
    with SpaceWriter(st, "x", spec) as w:
        with pytest.raises(StoreError, match="has row columns: write it shard by shard"):
            w.add(0, np.zeros((4, 2), np.float32))
        with pytest.raises(StoreError, match=r"needs the row columns \['source'\]"):
            w.write_shard(0, np.zeros((4, 2), np.float32))
        for i, s in enumerate(st.shards):
            w.write_shard(i, lambda s=s: (np.full((s.rows, 2), s.index, np.float32),
                                          {"source": np.arange(s.start, s.stop)}))
    from fct_lightning.store import finalize_space

    st = finalize_space(st, "x")
    assert st.space("x").columns == {"source": "int16"} and len(st.space("x").columns_sha256) == 3
    assert st.row_columns("x", 2).column("source").to_pylist() == [8, 9] and verify_store(st) == []
    assert not list((tmp_path / "s" / "x").glob("*.parquet"))  # the space folder holds the arrays only
    with SpaceWriter(st, "x", spec) as w:  # complete and checked: nothing to redo
        assert w.pending == []
    table = pq.read_table(st.columns_path("x", 1))
    pq.write_table(table.set_column(0, "source", table.column(0).cast("int32")), st.columns_path("x", 1))
    problems = verify_store(st)
    assert len(problems) == 1 and "x.columns/part-00001.parquet does not match its sha256" in problems[0]
    with SpaceWriter(st, "x", spec) as w:  # the changed table is redone
        assert w.pending == [1]
    with pytest.raises(StoreError, match="row column 'bad name'"):
        SpaceSpec(role="r", dim=1, columns={"bad name": "int8"})
    with pytest.raises(StoreError, match="space 'x' of .* has no row column 'nope'"):
        open_store(tmp_path / "s").row_columns("x", 0, ["nope"])
