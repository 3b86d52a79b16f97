"""fct-eval on embedding stores: exact cases equal retrieval.evaluate on the stored arrays, index metrics beside them
(a factory string in memory, or an fct-index folder, refused when stale), separate query stores, backfilling curves
equal backfill.py's on the same arrays, and bad input ending in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fct_lightning.backfill import BackfillContext, backfill_curves
from fct_lightning.index import build_index
from fct_lightning.retrieval import evaluate
from fct_lightning.store import SpaceSpec, Store, create_store, import_arrays, open_store, write_space
from tests.commands import eval_main

N, D, CLASSES = 120, 8, 6


def vectors(seed: int, n: int = N) -> dict[str, np.ndarray]:
    """Clustered old/new rows (the class decides the centre), a transformed ``fct+side`` near ``new``, its
    uncertainty (larger where the transformation erred more) and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    centres_old, centres_new = rng.standard_normal((2, CLASSES, D)) * 2
    old = centres_old[labels] + rng.standard_normal((n, D))
    new = centres_new[labels] + rng.standard_normal((n, D))
    err = rng.standard_normal((n, D)) * rng.uniform(0.2, 2.0, (n, 1))
    return {"old": old.astype(np.float32), "new": new.astype(np.float32), "fct+side": (new + err).astype(np.float32),
            "fct+side-uncertainty": np.log((err ** 2).mean(1, keepdims=True)).astype(np.float32),
            "labels": labels.astype(np.int64)}


def make_store(path: Path, data: dict[str, np.ndarray], dtype: str = "float32", prefix: str = "i",
               digests: dict[str, str] | None = None) -> Store:
    """A store of ``data``'s rows (shards of 50 rows), ids ``<prefix>-<row>``."""
    n = len(data["labels"])
    store = create_store(path, [f"{prefix}-{r}" for r in range(n)], data["labels"], shard_rows=50)
    for space, rows in data.items():
        if space == "labels":
            continue
        spec = SpaceSpec(role="uncertainty" if space.endswith("-uncertainty") else space, dim=rows.shape[1],
                         dtype="float32" if space.endswith("-uncertainty") else dtype,
                         checkpoint_digest=(digests or {}).get(space))
        write_space(store, space, spec, lambda i, rows=rows: rows[store.shards[i].start:store.shards[i].stop])
    return open_store(path)


def stored(store: Store, space: str) -> np.ndarray:
    return np.concatenate([store.array(space, i) for i in range(len(store.shards))]).astype(np.float32)


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "eval.json"
    got = eval_main([*args, "--out", str(out), "--no_wandb", "--device", "cpu"])
    assert json.loads(out.read_text()) == got  # the file is what the command returned
    return got


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return vectors(0)


@pytest.fixture
def store(tmp_path: Path, data: dict[str, np.ndarray]) -> Store:
    return make_store(tmp_path / "store", data)


CASES = "old/old,new/new,new/old,fct+side/old"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_cases_on_a_store_equal_evaluate_on_its_arrays(tmp_path, data, dtype, capsys):
    """Leave-one-out on one store: every case equals retrieval.evaluate on the stored rows (float16 read as float32),
    the default cases are those the store has (bct listed as missing), flips against old/old are there, and the
    printed table has no index columns."""
    st = make_store(tmp_path / "s", data, dtype)
    got = run(tmp_path, "--query_store", str(st.path), "--gallery_store", str(st.path))
    assert set(got["cases"]) == {"old/old", "new/new", "new/old", "fct+side/old"}
    assert "bct/old" in got["missing"] and "has no space 'bct'" in got["missing"]["bct/old"]
    assert got["meta"]["leave_one_out"] and got["meta"]["n_items"] == N
    if dtype == "float16":
        assert not np.array_equal(stored(st, "new"), data["new"])  # the rounding is what is measured
    for case, (q, g) in {"old/old": ("old", "old"), "new/new": ("new", "new"), "new/old": ("new", "old"),
                         "fct+side/old": ("new", "fct+side")}.items():
        want = evaluate(torch.from_numpy(stored(st, q)), torch.from_numpy(data["labels"]),
                        torch.from_numpy(stored(st, g)), torch.from_numpy(data["labels"]), exclude_self=True)
        assert got["cases"][case] == want, case
    assert set(got["flips"]) == {"new/new", "new/old", "fct+side/old"}
    assert "(index)" not in capsys.readouterr().out


def test_index_flat_equals_exact_and_ivf_gives_index_keys(tmp_path, store, capsys):
    """--index Flat: index/top1, index/top5, index/map@r equal the exact values (no index/map: exact only); an IVF
    index probing one of 8 lists gives values in [0, 1] that differ from exact somewhere, and probing every list
    comes back to exact."""
    args = ("--query_store", str(store.path), "--gallery_store", str(store.path), "--cases", CASES)
    flat = run(tmp_path, *args, "--index", "Flat")
    for case, m in flat["cases"].items():
        assert {k for k in m if k.startswith("index/")} == {"index/top1", "index/top5", "index/map@r"}
        assert [m[f"index/{k}"] for k in ("top1", "top5", "map@r")] == [m["top1"], m["top5"], m["map@r"]], case
    assert "mAP@R (index)" in capsys.readouterr().out
    assert flat["meta"]["index"]["factory"] == "Flat" and "exact search only" in flat["meta"]["index"]["note"]
    ivf = run(tmp_path, *args, "--index", "IVF8,Flat", "--nprobe", "1")
    values = [m[f"index/{k}"] for m in ivf["cases"].values() for k in ("top1", "top5", "map@r")]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert any(m["index/map@r"] != m["map@r"] for m in ivf["cases"].values())
    assert all(m["map"] == flat["cases"][c]["map"] for c, m in ivf["cases"].items())  # exact side unchanged
    full = run(tmp_path, *args, "--index", "IVF8,Flat", "--nprobe", "8")
    for case, m in full["cases"].items():
        assert m["index/top1"] == pytest.approx(m["top1"], abs=1 / N) and m["index/map@r"] == pytest.approx(
            m["map@r"], abs=0.02), case


def test_an_fct_index_folder_is_used_for_its_space_and_refused_when_stale(tmp_path, store, data):
    """--index_path: the cases whose gallery is the indexed space get index/ metrics (a Flat index: the exact
    values), the others none; after the space is rewritten the index is refused, naming the rebuild."""
    build_index(store, "fct+side", "Flat", tmp_path / "g.index", device="cpu")
    args = ("--query_store", str(store.path), "--gallery_store", str(store.path), "--cases", CASES,
            "--index_path", str(tmp_path / "g.index"))
    got = run(tmp_path, *args)
    m = got["cases"]["fct+side/old"]
    assert [m["index/top1"], m["index/top5"]] == [m["top1"], m["top5"]]
    assert m["index/map@r"] == pytest.approx(m["map@r"], abs=1e-9)
    assert not any(k.startswith("index/") for c in ("old/old", "new/new", "new/old") for k in got["cases"][c])
    rows = data["fct+side"][::-1].copy()
    write_space(store, "fct+side", SpaceSpec(role="fct+side", dim=D, provenance={"v": 2}),
                lambda i: rows[store.shards[i].start:store.shards[i].stop], overwrite=True)
    with pytest.raises(SystemExit, match="built on another version of space 'fct\\+side'.*fct-index"):
        run(tmp_path, *args)


def test_separate_query_and_gallery_stores(tmp_path, data):
    """A query store of other items: every query ranked against the whole gallery (no leave-one-out), equal to
    retrieval.evaluate with exclude_self=False; --pairing leave_one_out is refused for them."""
    queries = vectors(1, n=40)
    q_store, g_store = make_store(tmp_path / "q", queries, prefix="q"), make_store(tmp_path / "g", data)
    args = ("--query_store", str(q_store.path), "--gallery_store", str(g_store.path), "--cases", CASES)
    got = run(tmp_path, *args, "--index", "Flat")
    assert not got["meta"]["leave_one_out"] and got["meta"]["n_queries"] == 40
    for case, (q, g) in {"new/new": ("new", "new"), "fct+side/old": ("new", "fct+side")}.items():
        want = evaluate(torch.from_numpy(queries[q]), torch.from_numpy(queries["labels"]), torch.from_numpy(data[g]),
                        torch.from_numpy(data["labels"]), exclude_self=False)
        assert {k: got["cases"][case][k] for k in want} == want
        assert got["cases"][case]["index/top1"] == want["top1"]
    with pytest.raises(SystemExit, match="--pairing leave_one_out needs .* the same items"):
        run(tmp_path, *args, "--pairing", "leave_one_out")


def test_the_same_items_in_two_stores_are_leave_one_out(tmp_path, data):
    """A gallery copy of the same items (e.g. a transformed store) next to the query store: leave-one-out, the
    same numbers as one store."""
    one = make_store(tmp_path / "one", data)
    q = make_store(tmp_path / "q", {k: data[k] for k in ("new", "labels")})
    g = make_store(tmp_path / "g", {k: data[k] for k in ("fct+side", "labels")})
    a = run(tmp_path, "--query_store", str(one.path), "--gallery_store", str(one.path), "--cases", "fct+side/old")
    b = run(tmp_path, "--query_store", str(q.path), "--gallery_store", str(g.path), "--cases", "fct+side/old")
    assert b["meta"]["leave_one_out"] and a["cases"] == b["cases"]


@pytest.mark.parametrize("separate", [False, True])
def test_backfilling_curves_on_stores_equal_backfill_py(tmp_path, data, separate):
    """--backfill random,uncertainty: the curves equal backfill_curves on the same arrays (the uncertainty order
    from the store's fct+side-uncertainty space); with --index Flat each curve also has index/ points equal to its
    exact ones."""
    g_store = make_store(tmp_path / "g", data)
    queries = vectors(1, n=40) if separate else data
    q_store = make_store(tmp_path / "q", queries, prefix="q") if separate else g_store
    got = run(tmp_path, "--query_store", str(q_store.path), "--gallery_store", str(g_store.path), "--cases",
              "old/old,fct+side/old", "--backfill", "random,uncertainty", "--points", "5", "--backfill_seeds", "2",
              "--index", "Flat")
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    ctx = BackfillContext(t["fct+side"], t["new"], t["labels"], t["fct+side-uncertainty"][:, 0])
    query = {} if not separate else {"query_new": torch.from_numpy(queries["new"]),
                                     "query_labels": torch.from_numpy(queries["labels"])}
    old_old = evaluate(torch.from_numpy(queries["old"]), torch.from_numpy(queries["labels"]), t["old"], t["labels"],
                       exclude_self=not separate)
    assert got["cases"]["old/old"]["top1"] == old_old["top1"]
    from fct_lightning.retrieval.compat import top1_correct
    from fct_lightning.retrieval.evaluate import evaluate_queries

    reference = top1_correct(evaluate_queries(torch.from_numpy(queries["old"]), torch.from_numpy(queries["labels"]),
                                              t["old"], t["labels"], exclude_self=not separate))
    want = backfill_curves(ctx, ["random", "uncertainty"], seeds=(0, 1), points=5, reference_correct=reference,
                           **query)
    assert set(got["backfill"]) == {"fct+side random", "fct+side uncertainty"}
    for policy, curve in want.items():
        mine = got["backfill"][f"fct+side {policy}"]
        assert {k: mine["curves"][k] for k in curve["curves"]} == curve["curves"]
        assert mine["flips"] == curve["flips"] and mine["fractions"] == curve["fractions"]
        for m in ("top1", "top5", "map@r"):
            assert mine["curves"][f"index/{m}"] == pytest.approx(curve["curves"][m], abs=1e-12), (policy, m)
            assert f"index/{m}" in mine["auc_mean"]
    assert got["backfill"]["fct+side uncertainty"]["curves"] != got["backfill"]["fct+side random"]["curves"]


def test_backfill_without_an_uncertainty_space_skips_that_policy(tmp_path, data):
    """No fct+side-uncertainty space: the uncertainty policy is skipped (random stays); alone, it is an error."""
    st = make_store(tmp_path / "s", {k: v for k, v in data.items() if k != "fct+side-uncertainty"})
    args = ("--query_store", str(st.path), "--gallery_store", str(st.path), "--cases", "new/new", "--points", "3")
    got = run(tmp_path, *args, "--backfill", "random,uncertainty")
    assert set(got["backfill"]) == {"fct+side random"}
    with pytest.raises(SystemExit, match="no backfilling curve could be computed"):
        run(tmp_path, *args, "--backfill", "uncertainty")


def test_float16_store_through_import_arrays(tmp_path, data):
    """A store imported from .npy files as float16 (fct-store import): the exact numbers are those of the float16
    rows, and an IVF index through it still gives every index/ key."""
    files = {}
    for space in ("old", "new"):
        np.save(tmp_path / f"{space}.npy", data[space])
        files[space] = tmp_path / f"{space}.npy"
    np.save(tmp_path / "labels.npy", data["labels"])
    st = import_arrays(tmp_path / "imp", files, labels=tmp_path / "labels.npy", shard_rows=40, dtype="float16")
    got = run(tmp_path, "--query_store", str(st.path), "--gallery_store", str(st.path), "--cases", "new/old",
              "--index", "IVF4,Flat", "--nprobe", "2")
    want = evaluate(torch.from_numpy(stored(st, "new")), torch.from_numpy(data["labels"]),
                    torch.from_numpy(stored(st, "old")), torch.from_numpy(data["labels"]), exclude_self=True)
    assert {k: got["cases"]["new/old"][k] for k in want} == want
    assert {"index/top1", "index/top5", "index/map@r"} <= set(got["cases"]["new/old"])


@pytest.mark.parametrize(("args", "message"), [
    (["--cases", "bct/old"], "case bct/old: the query store .* has no space 'bct'"),
    (["--space", "new/nope"], "case new/nope: the gallery store .* has no space 'nope'"),
    (["--space", "new/small"], "case new/small: the query space 'new' is 8-d but the gallery space 'small' is 4-d"),
    (["--space", "newold"], "--space 'newold' must be QUERY_SPACE/GALLERY_SPACE"),
    (["--index", "Flat", "--index_path", "x"], "not both"),
    (["--nprobe", "4"], "--nprobe set the index search: give --index"),
    (["--index", "Flat", "--nprobe", "4"], "nprobe=4 needs an IVF index"),
    (["--search_params", "efSearch=64"], "--search_params set the index search: give --index"),
    (["--index", "HNSW8", "--search_params", "efSearch"], "'efSearch' is not NAME=NUMBER"),
    (["--index", "Flat", "--search_params", "efSearch=64"], "efSearch=64 does not apply to this IndexFlat index"),
    (["--index", "IVF9999,Flat"], "could not be trained"),
    (["--split", "test"], "--split choose images to embed"),
    (["--pairing", "leave_one_out", "--gallery_store", "OTHER"], "--pairing leave_one_out needs"),
    (["--backfill", "random"], "backfilling \\(the gallery items' new-model rows\\) needs space 'new'"),
])
def test_bad_input_is_one_line(tmp_path, data, args, message, capsys):
    """Each mistake ends in one line naming the option or the space (the command's error wrapper)."""
    st = make_store(tmp_path / "s", {**{k: data[k] for k in ("new", "old", "labels")},
                                     "small": np.ones((N, 4), np.float32)})
    other = make_store(tmp_path / "o", vectors(3, n=30), prefix="o")
    if args == ["--backfill", "random"]:  # a transformed space but no new rows in the gallery store
        st = make_store(tmp_path / "t", {k: data[k] for k in ("fct+side", "old", "labels")})
        args = ["--backfill", "random", "--cases", "old/old"]
    full = ["--query_store", str(st.path), "--gallery_store", str(st.path),
            *[str(other.path) if a == "OTHER" else a for a in args]]
    with pytest.raises(SystemExit, match=message) as err:
        run(tmp_path, *full)
    assert "\n" not in str(err.value).split("\n(set FCT_DEBUG")[0]


def test_store_options_without_stores_are_refused(tmp_path):
    """--index (and the other store options) on the checkpoint path: one line saying stores are needed."""
    with pytest.raises(SystemExit, match="--index evaluate embedding stores: give --query_store and --gallery_store"):
        eval_main(["--index", "Flat", "--no_wandb"])


def test_stores_with_mismatched_checkpoints_are_refused(tmp_path, data):
    """The query store's new space and the gallery's come from different recorded checkpoints: refused."""
    q = make_store(tmp_path / "q", {k: data[k] for k in ("new", "labels")}, digests={"new": "sha256:aa"})
    g = make_store(tmp_path / "g", {k: data[k] for k in ("new", "labels")}, digests={"new": "sha256:bb"})
    with pytest.raises(SystemExit, match="space 'new' is from checkpoint sha256:aa .* but sha256:bb"):
        run(tmp_path, "--query_store", str(q.path), "--gallery_store", str(g.path), "--cases", "new/new")


def test_fct_report_reads_a_store_results_file(tmp_path, store):
    """The results file of fct-eval on stores (index metrics and curves included) is one fct-report reads: its
    table has the exact metrics of every case and the backfilling AUC rows."""
    from fct_lightning.report import make_report

    run(tmp_path, "--query_store", str(store.path), "--gallery_store", str(store.path), "--cases", CASES,
        "--index", "Flat", "--backfill", "random", "--points", "3", "--backfill_seeds", "1")
    files = make_report([tmp_path / "eval.json"], tmp_path / "report")
    text = files["md"].read_text()
    assert "| fct+side/old |" in text and "backfill fct+side random (mean AUC)" in text
