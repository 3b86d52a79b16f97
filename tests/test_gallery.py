"""fct-embed and fct-transform: a stored gallery moved into the new model's space, checked against fct-eval's path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fct_lightning.commands.fit import fit
from fct_lightning.data import DATAMODULES
from fct_lightning.gallery import embed, transform
from fct_lightning.gallery.files import FORMAT, _part_prefix, fingerprint, partial_fingerprint, read_meta
from fct_lightning.stages import load_h, load_stage
from fct_lightning.stages.checkpoints import CheckpointError
from tests.commands import embed_main, transform_main
from tests.data.fakes import make_imagefolder
from tests.stages.test_query_gallery import (  # 16 px images, a width-8 ConvNet, one short epoch
    NET,
    SMALL,
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("gallery")
    root = make_imagefolder(base / "data", 4, {"train": 4, "val": 3}, size=20, ext="jpg+png")
    art = base / "art"
    common = ["--dataset", "folder", "--artifacts", str(art), "--data.root", str(root), *SMALL]
    for stage in ("old", "side_info", "new"):
        fit(["--stage", stage, *common, *NET])
    for extra in ([], ["--model.use_side_info", "false"], ["--model.uncertainty", "true"]):
        fit(["--stage", "transformation", *common, "--model.mixer_width", "32", "--model.cache_views", "1", *extra])
    return root, art / "folder"


@pytest.fixture(scope="module")
def stored(chain, tmp_path_factory):
    """The val split embedded with the old and side-info models, as a deployed system stores its gallery."""
    _, run = chain
    out = tmp_path_factory.mktemp("stored")
    old = embed(run / "old" / "best.ckpt", out / "old.npy", split="val")
    side = embed(run / "side_info" / "best.ckpt", out / "side.npy", split="val")
    return old, side


def _gallery_by_hand(run: Path, folder: str, root: Path) -> torch.Tensor:
    """h(old(x), side(x)) of the val images through the stage module, as fct-eval computes the gallery."""
    module, _ = load_stage(run / folder / "best.ckpt", "transformation", ("transformation",), "folder")
    dm = DATAMODULES["folder"](root=str(root), image_size=16, eval_batch_size=5)
    with torch.no_grad():
        parts = [(module.gallery_embed(x), idx) for x, _, idx in dm.eval_dataloader("val")]
    emb = torch.cat([e for e, _ in parts])
    return emb[torch.argsort(torch.cat([i for _, i in parts]))]


def test_embed_writes_rows_in_item_order_with_a_description(chain, stored):
    root, run = chain
    old, _ = stored
    arr = np.load(old)
    meta = json.loads(old.with_suffix(".json").read_text())
    assert arr.shape == (12, 128) and arr.dtype == np.float32
    assert meta["stage"] == "old" and meta["rows"] == 12 and meta["embedding_dim"] == 128
    assert meta["source"]["split"] == "val" and meta["dataset"] == "folder"
    module, info = load_stage(run / "old" / "best.ckpt", "old", ("old",))
    assert meta["digest"] == info["digest"]
    dm = DATAMODULES["folder"](root=str(root), image_size=16, eval_batch_size=7)
    x, y, idx = next(iter(dm.eval_dataloader("val")))
    with torch.no_grad():
        np.testing.assert_allclose(arr[idx.numpy()], module.query_embed(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(old.with_suffix(".labels.npy"))[idx.numpy()], y.numpy())


def test_transformed_gallery_equals_the_evaluated_one(chain, stored, tmp_path):
    root, run = chain
    old, side = stored
    out = transform(run / "transformation" / "best.ckpt", old, tmp_path / "fct.npy", side=side)
    want = _gallery_by_hand(run, "transformation", root)
    np.testing.assert_allclose(np.load(out), want.numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["space"] == "fct+side" and meta["rows"] == 12 and meta["inputs"]["old"]["digest"]
    assert meta["labels"] == "fct.labels.npy" and meta["ids"] is None  # the split's labels travel with the rows
    np.testing.assert_array_equal(np.load(out.with_suffix(".labels.npy")), np.load(old.with_suffix(".labels.npy")))
    # in chunks of 5 rows (memory-mapped input, streamed output): the same rows
    again = transform(run / "transformation" / "best.ckpt", old, tmp_path / "fct5.npy", side=side, batch_size=5)
    np.testing.assert_allclose(np.load(again), np.load(out), rtol=1e-5, atol=1e-6)
    # without side-info
    out = transform(run / "transformation_noside" / "best.ckpt", old, tmp_path / "fct_noside.npy")
    np.testing.assert_allclose(np.load(out), _gallery_by_hand(run, "transformation_noside", root).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_fastfill_writes_the_uncertainty_of_each_item(chain, stored, tmp_path):
    _, run = chain
    old, side = stored
    unc = tmp_path / "unc.npy"
    out = transform(run / "fastfill" / "best.ckpt", old, tmp_path / "ff.npy", side=side, uncertainty_out=unc)
    module, _ = load_stage(run / "fastfill" / "best.ckpt", "transformation", ("transformation",))
    pred, log_var = module.h.transform_stored(torch.from_numpy(np.load(old)), torch.from_numpy(np.load(side)),
                                              uncertainty=True)
    np.testing.assert_allclose(np.load(out), pred.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.load(unc), log_var.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a FastFill transformation"):
        transform(run / "transformation" / "best.ckpt", old, tmp_path / "x.npy", side=side,
                  uncertainty_out=tmp_path / "u.npy")


def test_h_loads_without_the_frozen_models(chain, tmp_path):
    """A serving machine has h's checkpoint only: the old, side-info and new checkpoints are not read."""
    _, run = chain
    lone = tmp_path / "h.ckpt"
    lone.write_bytes((run / "transformation" / "best.ckpt").read_bytes())
    h, meta = load_h(lone)
    assert (h.old_dim, h.side_dim, h.new_dim) == (128, 128, 128) and not h.training
    assert meta["old_digest"] and meta["side_info_digest"]


def test_embed_a_folder_of_images(chain, stored, tmp_path):
    root, run = chain
    old, _ = stored
    out = embed(run / "old" / "best.ckpt", tmp_path / "imgs.npy", images=root / "val")
    ids = [json.loads(line) for line in out.with_suffix(".ids.txt").read_text().splitlines()]
    assert len(ids) == 12 and ids == sorted(ids) and all(i.startswith("class_") for i in ids)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["ids"] == "imgs.ids.txt" and meta["labels"] is None
    # the same files through the split's loader: the same embeddings, in the same sorted order
    np.testing.assert_allclose(np.load(out), np.load(old), rtol=1e-5, atol=1e-5)
    side = embed(run / "side_info" / "best.ckpt", tmp_path / "imgs_side.npy", images=root / "val")
    res = transform(run / "transformation" / "best.ckpt", out, tmp_path / "imgs_fct.npy", side=side)
    assert res.with_suffix(".ids.txt").read_text() == out.with_suffix(".ids.txt").read_text()


def test_embed_refuses(chain, tmp_path):
    root, run = chain
    with pytest.raises(CheckpointError, match="fct-embed runs an image model"):
        embed(run / "transformation" / "best.ckpt", tmp_path / "a.npy", split="val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed(tmp_path / "none.ckpt", tmp_path / "a.npy")
    with pytest.raises(ValueError, match="not both"):
        embed(run / "old" / "best.ckpt", tmp_path / "a.npy", split="val", images=root)
    with pytest.raises(ValueError, match="must end in .npy"):
        embed(run / "old" / "best.ckpt", tmp_path / "a.bin", split="val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        embed(run / "old" / "best.ckpt", tmp_path / "a.npy", images=tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.jpg.*--skip_unreadable"):
        embed(run / "old" / "best.ckpt", tmp_path / "a.npy", images=bad)
    assert not (tmp_path / "a.npy").exists() and not list(tmp_path.glob(".a.npy*"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        embed(run / "old" / "best.ckpt", tmp_path / "file" / "a.npy", split="val")
    (tmp_path / "b.json").write_text("{}")  # a description without its array: replacing it needs --overwrite
    with pytest.raises(ValueError, match="b.json exists; pass --overwrite"):
        embed(run / "old" / "best.ckpt", tmp_path / "b.npy", split="val")


def test_unreadable_images_are_left_out_on_request(chain, tmp_path):
    root, run = chain
    gallery = tmp_path / "gallery"
    shutil.copytree(root / "val", gallery)
    broken = sorted((gallery / "class_001").iterdir())[1]
    broken.write_bytes(b"broken")
    out = embed(run / "old" / "best.ckpt", tmp_path / "g.npy", images=gallery, skip_unreadable=True)
    meta = json.loads(out.with_suffix(".json").read_text())
    ids = [json.loads(line) for line in out.with_suffix(".ids.txt").read_text().splitlines()]
    assert meta["rows"] == 11 == len(np.load(out)) == len(ids)
    assert meta["unreadable"] == [f"class_001/{broken.name}"]
    whole = embed(run / "old" / "best.ckpt", tmp_path / "w.npy", images=root / "val")
    whole_ids = [json.loads(line) for line in whole.with_suffix(".ids.txt").read_text().splitlines()]
    keep = [whole_ids.index(i) for i in ids]  # the rows kept are the other images' rows, in order
    np.testing.assert_allclose(np.load(out), np.load(whole)[keep], rtol=1e-5, atol=1e-6)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="none of the 1 image files .* could be decoded"):
        embed(run / "old" / "best.ckpt", tmp_path / "j.npy", images=junk, skip_unreadable=True)
    assert not (tmp_path / "j.npy").exists()


def test_serving_machine_without_config_or_training_data(chain, stored, tmp_path):
    """A checkpoint copied alone embeds at the size it was trained at, and --images needs no training data."""
    root, run = chain
    old, _ = stored
    lone = tmp_path / "ckpt" / "old.ckpt"
    lone.parent.mkdir()
    shutil.copyfile(run / "old" / "best.ckpt", lone)  # no config.yaml next to it
    gallery = tmp_path / "gallery"
    shutil.copytree(root / "val", gallery)
    out = embed(lone, tmp_path / "g.npy", images=gallery, data_root=str(tmp_path / "nowhere"))
    assert json.loads(out.with_suffix(".json").read_text())["source"]["image_size"] == 16
    np.testing.assert_allclose(np.load(out), np.load(old), rtol=1e-5, atol=1e-6)


def test_items_are_compared_by_content_not_by_path(chain, stored, tmp_path):
    """The same split read from a moved data root, or the same images from another folder, are the same items."""
    root, run = chain
    old, side = stored
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    side2 = embed(run / "side_info" / "best.ckpt", tmp_path / "side2.npy", split="val", data_root=str(moved))
    transform(run / "transformation" / "best.ckpt", old, tmp_path / "fct.npy", side=side2)
    a = embed(run / "old" / "best.ckpt", tmp_path / "a.npy", images=root / "val")
    b = embed(run / "side_info" / "best.ckpt", tmp_path / "b.npy", images=moved / "val")
    transform(run / "transformation" / "best.ckpt", a, tmp_path / "ab.npy", side=b)
    with pytest.raises(ValueError, match="one from image files, one from a dataset split"):
        transform(run / "transformation" / "best.ckpt", a, tmp_path / "x.npy", side=side)
    short = b.with_suffix(".ids.txt")
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="lists 11 items but .* has 12 rows"):
        transform(run / "transformation" / "best.ckpt", a, tmp_path / "x.npy", side=b)


def test_transform_refuses_inputs_it_cannot_map(chain, stored, tmp_path):
    _, run = chain
    old, side = stored
    h = run / "transformation" / "best.ckpt"
    new = embed(run / "new" / "best.ckpt", tmp_path / "new.npy", split="val")
    with pytest.raises(ValueError, match="holds 'new' embeddings"):
        transform(h, new, tmp_path / "o.npy", side=side)
    # embeddings of another old model (its digest in the description)
    other = tmp_path / "other.npy"
    other.write_bytes(old.read_bytes())
    shutil.copyfile(old.with_suffix(".labels.npy"), other.with_suffix(".labels.npy"))
    meta = json.loads(old.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps(dict(meta, digest="0123456789abcdef")))
    with pytest.raises(ValueError, match="trained on another old model"):
        transform(h, other, tmp_path / "o.npy", side=side)
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, np.zeros((12, 7), np.float32))
    with pytest.raises(ValueError, match="dimension mismatch: .* 7-d rows"):
        transform(h, narrow, tmp_path / "o.npy", side=side)
    short = tmp_path / "short.npy"
    np.save(short, np.load(side)[:5])
    with pytest.raises(ValueError, match="12 rows but .* has 5"):
        transform(h, old, tmp_path / "o.npy", side=short)
    with pytest.raises(ValueError, match="uses side-info: pass"):
        transform(h, old, tmp_path / "o.npy")
    with pytest.raises(ValueError, match="trained without side-info"):
        transform(run / "transformation_noside" / "best.ckpt", old, tmp_path / "o.npy", side=side)
    with pytest.raises(CheckpointError, match="h is read from a transformation checkpoint"):
        transform(run / "old" / "best.ckpt", old, tmp_path / "o.npy", side=side)
    corrupt = tmp_path / "corrupt.npy"
    corrupt.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="cannot be read as a .npy array"):
        transform(h, corrupt, tmp_path / "o.npy", side=side)
    with pytest.raises(ValueError, match="would replace .*old.npy"):
        transform(h, old, old, side=side, overwrite=True)
    before = {p: p.read_bytes() for p in old.parent.iterdir()}
    with pytest.raises(ValueError, match="--uncertainty_out .* would replace .*old.npy"):
        transform(run / "fastfill" / "best.ckpt", old, tmp_path / "ff.npy", side=side, uncertainty_out=old,
                  overwrite=True)
    with pytest.raises(ValueError, match="--out .*old.labels.npy would replace"):
        transform(h, old, old.with_suffix(".labels.npy"), side=side, overwrite=True)
    assert {p: p.read_bytes() for p in old.parent.iterdir()} == before
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[object()]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        transform(h, objects, tmp_path / "o.npy", side=side)
    assert not (tmp_path / "o.npy").exists()


def test_a_description_that_does_not_match_its_array_is_refused(chain, stored, tmp_path):
    """After a crash or a hand copy, old.json may sit next to other rows of the same shape: refused, not trusted."""
    _, run = chain
    old, side = stored
    for f in (old, old.with_suffix(".json"), old.with_suffix(".labels.npy")):
        shutil.copyfile(f, tmp_path / f.name)
    np.save(tmp_path / "old.npy", np.load(old) + 1)  # same shape, other rows
    with pytest.raises(ValueError, match="old.json does not describe"):
        transform(run / "transformation" / "best.ckpt", tmp_path / "old.npy", tmp_path / "o.npy", side=side)


def _described(path: Path, rows: int, fp: str) -> None:
    path.with_suffix(".json").write_text(json.dumps({"format": FORMAT, "rows": rows, "fingerprint": fp}))


def _flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))


def test_the_fingerprint_covers_the_whole_array(tmp_path):
    """One byte changed in the middle of an 8 MiB gallery (far from its first and last MiB) is detected."""
    path = tmp_path / "g.npy"
    np.save(path, np.random.default_rng(0).standard_normal((16384, 128), dtype=np.float32))
    fp = fingerprint(path)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    _described(path, 16384, fp)
    assert read_meta(path, 16384)["fingerprint"] == fp
    _flip_middle_byte(path)
    with pytest.raises(ValueError, match=r"g.json does not describe .*g.npy: .*\(one was replaced or changed\)"):
        read_meta(path, 16384)


def test_a_fingerprint_of_the_older_kind_is_checked_with_a_warning(tmp_path, caplog):
    """Descriptions written before whole-file fingerprints (16 hex digits: size, first and last MiB) stay usable:
    what they cover is checked, and a warning says what is not."""
    path = tmp_path / "g.npy"
    np.save(path, np.zeros((16384, 128), dtype=np.float32))
    _described(path, 16384, partial_fingerprint(path))
    with caplog.at_level("WARNING", logger="fct_lightning.gallery.files"):
        assert read_meta(path, 16384) is not None
    assert "older, partial fingerprint" in caplog.text and "fct-embed" in caplog.text
    _flip_middle_byte(path)
    assert read_meta(path, 16384) is not None  # the limit of the older kind: the middle was never covered
    with open(path, "r+b") as fh:  # its first MiB still is
        fh.seek(1000)
        fh.write(b"\x01")
    with pytest.raises(ValueError, match="does not describe"):
        read_meta(path, 16384)
    _described(path, 16384, "md5:0123")
    with pytest.raises(ValueError, match="g.json holds a fingerprint of an unknown kind"):
        read_meta(path, 16384)


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(chain, stored, tmp_path):
    _, run = chain
    old, side = stored
    out = tmp_path / "fct.npy"
    left = tmp_path / f"{_part_prefix(out)}999999999.part"  # no such process
    left.write_bytes(b"x" * 1000)
    transform(run / "transformation" / "best.ckpt", old, out, side=side)
    assert not left.exists() and out.is_file()


def test_a_nan_row_loses_nothing(chain, stored, tmp_path):
    """A NaN in the stored gallery stops the run, names the row, and leaves the previous output as it was."""
    _, run = chain
    old, side = stored
    h = run / "transformation" / "best.ckpt"
    out = transform(h, old, tmp_path / "fct.npy", side=side)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        transform(h, old, out, side=side)
    broken = tmp_path / "broken.npy"
    arr = np.load(old).copy()
    arr[9, 3] = np.nan
    np.save(broken, arr)
    with pytest.raises(ValueError, match="row 9 of .*broken.npy is not finite"):
        transform(h, broken, out, side=side, overwrite=True, batch_size=4)
    assert out.read_bytes() == before and not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_command_lines_print_one_message(chain, stored, tmp_path, capsys):
    _, run = chain
    old, _ = stored
    with pytest.raises(SystemExit, match="fct-transform: the transformation .* uses side-info"):
        transform_main(["--checkpoint", str(run / "transformation" / "best.ckpt"), "--old", str(old),
                        "--out", str(tmp_path / "o.npy")])
    out = embed_main(["--checkpoint", str(run / "new" / "best.ckpt"), "--out", str(tmp_path / "q.npy")])
    assert np.load(out).shape == (12, 128) and "12 x 128" in capsys.readouterr().out
