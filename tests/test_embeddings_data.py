"""h from stored embeddings (``fct-fit --data embeddings``): the datamodule's batches, the same validation cases as
from images, a checkpoint that fct-transform accepts for the stores' models, and bad input refused in one line with
nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from fct_lightning.commands.fit import fit
from fct_lightning.data.embeddings import EmbeddingsDataModule
from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages.checkpoints import file_digest, read_checkpoint
from fct_lightning.store import SpaceSpec, StoreError, create_store, open_store, write_space

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false"]
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *QUIET]
SMALL_H = ["--model.mixer_width", "32", "--data.batch_size", "64"]


def make_store(path: Path, n: int, dims: dict[str, int], *, labels: bool = True, seed: int = 0, id_prefix: str = "item",
               digests: dict[str, str] | None = None, shard_rows: int = 100) -> Path:
    """A store of ``n`` synthetic items (5 classes) with one space per entry of ``dims``: the new space is a fixed
    function of the old one, so h can learn it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    centers = np.random.default_rng(99).normal(size=(5, 16))
    base = centers[y] + 0.3 * rng.normal(size=(n, 16))
    proj = np.random.default_rng(7)
    arrays = {space: np.tanh(base @ proj.normal(size=(16, d)) / 4).astype(np.float32) for space, d in dims.items()}
    st = create_store(path, [f"{id_prefix}{i}" for i in range(n)], y if labels else None, shard_rows=shard_rows)
    for space, arr in arrays.items():
        spec = SpaceSpec(role=space, dim=arr.shape[1], checkpoint_digest=(digests or {}).get(space, f"ckpt-{space}"),
                         provenance={"dataset": "synthetic"})
        write_space(st, space, spec, lambda i, arr=arr, st=st: arr[st.shards[i].start:st.shards[i].stop])
    return path


DIMS = {"old": 16, "side_info": 8, "new": 12}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    return make_store(root / "train", 300, DIMS), make_store(root / "val", 120, DIMS, seed=1, id_prefix="val")


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the datamodule
def test_batches_have_the_feature_cache_form_and_cover_every_item(stores):
    train, val = stores
    dm = EmbeddingsDataModule(str(train), str(val), batch_size=64)
    assert dm.name == "synthetic"  # from the spaces' provenance
    want = {s: {"dim": d, "digest": f"ckpt-{s}", "source": f"{train} (space {s})"} for s, d in DIMS.items()}
    assert dm.stored == want
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.set_epoch(0)
    first = list(loader)
    assert set(first[0]) == {"old", "side", "new", "labels", "index"}
    assert first[0]["old"].dtype == torch.float32 and first[0]["old"].shape == (64, 16)
    seen = torch.cat([b["index"] for b in first])
    assert sorted(seen.tolist()) == list(range(300))  # each training row once per epoch
    rows = open_store(train)
    stored_old = np.concatenate([rows.array("old", i) for i in range(len(rows.shards))])
    np.testing.assert_array_equal(torch.cat([b["old"] for b in first]).numpy(), stored_old[seen.numpy()])
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b["index"] for b in loader]), seen)  # another order next epoch
    batches = list(dm.val_dataloader())
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(120))
    assert torch.cat([b["labels"] for b in batches]).tolist() == open_store(val).labels(0).tolist() + \
        open_store(val).labels(1).tolist()


def test_spaces_from_several_stores_of_the_same_items(tmp_path):
    a = make_store(tmp_path / "a", 150, {"old": 16, "side_info": 8})
    b = make_store(tmp_path / "b", 150, {"new": 12})
    val = make_store(tmp_path / "val", 60, DIMS, seed=1)
    dm = EmbeddingsDataModule([str(a), str(b)], str(val))
    assert {r: s["dim"] for r, s in dm.stored.items()} == DIMS


# ------------------------------------------------------------------------------------------------ fct-fit
def test_fct_fit_from_stores_writes_a_checkpoint_fct_transform_accepts(stores, tmp_path):
    from fct_lightning.gallery.store_transform import transform_store
    from fct_lightning.stages.loading import load_h

    train, val = stores
    art = tmp_path / "art"
    cli = fit(["--stage", "transformation", "--data", "embeddings", "--data.train", str(train), "--data.val", str(val),
               "--artifacts", str(art), "--trainer.max_epochs", "2", *SMALL_H, *QUIET])
    ckpt = art / "synthetic" / "transformation" / "best.ckpt"
    meta = read_checkpoint(ckpt, "transformation")["fct"]
    assert (meta["old_digest"], meta["side_info_digest"], meta["new_digest"]) == ("ckpt-old", "ckpt-side_info",
                                                                                  "ckpt-new")
    assert meta["h"]["old_dim"] == 16 and meta["h"]["side_dim"] == 8 and meta["h"]["new_dim"] == 12
    assert set(cli.trainer.callback_metrics) >= {"val/fct+side/old/top1", "val/old/old/top1", "val/new/new/top1"}
    gallery = tmp_path / "gallery"
    make_store(gallery, 120, {"old": 16, "side_info": 8}, seed=1)
    done = transform_store(ckpt, gallery, device="cpu")
    assert done.published
    h, _ = load_h(ckpt)
    st = open_store(gallery)
    rows = [np.concatenate([st.array(s, i) for i in range(len(st.shards))]) for s in ("old", "side_info", "fct+side")]
    with torch.no_grad():
        want = h(torch.from_numpy(rows[0]), torch.from_numpy(rows[1])).numpy()
    np.testing.assert_allclose(rows[2], want, rtol=1e-5, atol=1e-5)
    other = tmp_path / "other"  # a gallery embedded by another old model: refused
    make_store(other, 120, {"old": 16, "side_info": 8}, digests={"old": "ckpt-another"})
    with pytest.raises(StoreError, match="trained on another old model"):
        transform_store(ckpt, other, device="cpu")


def test_fastfill_and_noside_from_stores(stores, tmp_path):
    train, val = stores
    common = ["--data", "embeddings", "--data.train", str(train), "--data.val", str(val), "--artifacts",
              str(tmp_path), *TINY, *SMALL_H]
    fit(["--stage", "transformation_noside", *common])
    assert read_checkpoint(tmp_path / "synthetic" / "transformation_noside" / "best.ckpt", "t")["fct"]["h"][
        "side_dim"] is None
    with pytest.raises(ValueError, match="fastfill_discriminative false"):
        fit(["--stage", "fastfill", *common])
    fit(["--stage", "fastfill", *common, "--model.fastfill_discriminative", "false"])
    assert read_checkpoint(tmp_path / "synthetic" / "fastfill" / "best.ckpt", "t")["fct"]["uncertainty"] is True


# ------------------------------------------------------------------------------------------------ bad input
def _refused(tmp_path: Path, args: list[str], match: str, *inputs: Path) -> None:
    """fct-fit with ``args`` fails with one line matching ``match``; no artifact is written, no input changed."""
    before = [_tree(p) for p in inputs]
    art = tmp_path / "art"
    with pytest.raises((ValueError, StoreError)) as err:
        fit(["--stage", "transformation", "--data", "embeddings", "--artifacts", str(art), *TINY, *args])
    assert err.match(match) and "\n" not in str(err.value)
    assert not art.exists()
    assert [_tree(p) for p in inputs] == before


def test_ids_that_differ_between_stores_are_refused(stores, tmp_path):
    train, val = stores
    a = make_store(tmp_path / "a", 300, {"old": 16, "side_info": 8})
    b = make_store(tmp_path / "b", 300, {"new": 12}, id_prefix="other")
    _refused(tmp_path, ["--data.train", f"[{a},{b}]", "--data.val", str(val)], "ids differ between the stores", a, b)


def test_a_space_of_another_dimension_is_refused(stores, tmp_path):
    train, _ = stores
    val = make_store(tmp_path / "val", 60, {"old": 16, "side_info": 8, "new": 10}, seed=1)
    _refused(tmp_path, ["--data.train", str(train), "--data.val", str(val)],
             "dimension mismatch: space 'new' is 12-d for the training items", train, val)


def test_a_validation_store_by_other_models_or_without_labels_is_refused(stores, tmp_path):
    train, _ = stores
    other = make_store(tmp_path / "other", 60, DIMS, seed=1, digests={"old": "ckpt-x"})
    _refused(tmp_path, ["--data.train", str(train), "--data.val", str(other)], "embedded with checkpoint ckpt-old")
    unlabelled = make_store(tmp_path / "unlabelled", 60, DIMS, labels=False)
    _refused(tmp_path, ["--data.train", str(train), "--data.val", str(unlabelled)], "have no labels")


def test_missing_spaces_are_refused(tmp_path):
    noside = make_store(tmp_path / "noside", 100, {"old": 16, "new": 12})
    _refused(tmp_path, ["--data.train", str(noside), "--data.val", str(noside)], "use_side_info false")
    nonew = make_store(tmp_path / "nonew", 100, {"old": 16})
    _refused(tmp_path, ["--data.train", str(nonew), "--data.val", str(nonew)], "has no space 'new'")


def test_image_stages_and_an_image_transformation_without_checkpoints_are_refused(stores):
    train, val = stores
    with pytest.raises(ValueError, match="trains an image model"):
        fit(["--stage", "old", "--data", "embeddings", "--data.train", str(train), "--data.val", str(val)])
    from fct_lightning.stages.transformation import TransformationModel

    with pytest.raises(ValueError, match="needs old_checkpoint and new_checkpoint"):
        TransformationModel()


# ------------------------------------------------------------------------------------------------ with the chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny digits chain (old, side_info, new) and its train and test splits embedded into stores."""
    from fct_lightning.gallery.store_embed import embed_store

    art = tmp_path_factory.mktemp("art")
    for stage in ("old", "side_info", "new"):
        fit(["--stage", stage, "--artifacts", str(art), *TINY, "--model.width", "8"])
    ckpts = [str(art / "digits" / r / "best.ckpt") for r in ("old", "side_info", "new")]
    stores = tmp_path_factory.mktemp("digits_stores")
    trainer = {"accelerator": "cpu", "devices": 1}
    embed_store(ckpts, stores / "train", split="train", shard_rows=500, trainer=trainer)
    embed_store(ckpts, stores / "test", split="test", shard_rows=500, trainer=trainer)
    return art / "digits", stores / "train", stores / "test"


def test_stored_validation_gives_the_image_cases(chain, tmp_path):
    """An h trained from the stores with its checkpoints given scores the same on the test split whether validation
    embeds the images with the frozen models or reads the stored embeddings."""
    from fct_lightning.data import DigitsDataModule
    from fct_lightning.stages.loading import load_stage

    digits, train, test = chain
    ckpt_args = [f"--model.{r}_checkpoint={digits / r / 'best.ckpt'}" for r in ("old", "side_info", "new")]
    fit(["--stage", "transformation", "--data", "embeddings", "--data.train", str(train), "--data.val", str(test),
         "--artifacts", str(tmp_path), *TINY, *SMALL_H, *ckpt_args])
    ckpt = tmp_path / "digits" / "transformation" / "best.ckpt"
    assert read_checkpoint(ckpt, "t")["fct"]["old_digest"] == file_digest(digits / "old" / "best.ckpt")
    model, _ = load_stage(ckpt, "transformation", ("transformation",), "digits")
    results = {}
    for name, dm in (("images", DigitsDataModule()), ("stored", EmbeddingsDataModule(str(train), str(test)))):
        cb = RetrievalEvaluation()
        pl.Trainer(callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu").validate(model, datamodule=dm, verbose=False)
        results[name] = cb.results
    assert set(results["images"]) == {"fct+side/old", "old/old", "new/new"}
    for case, metrics in results["images"].items():
        assert results["stored"][case] == pytest.approx(metrics, abs=1e-6), case


def test_checkpoints_that_did_not_embed_the_stores_are_refused(chain, tmp_path):
    digits = chain[0]
    wrong = make_store(tmp_path / "wrong", 100, {"old": 16, "side_info": 128, "new": 128})
    _refused(tmp_path, ["--data.train", str(wrong), "--data.val", str(wrong), "--data.dataset", "digits",
                        f"--model.old_checkpoint={digits / 'old' / 'best.ckpt'}"], "dimension mismatch: the stored old")
    same_dims = make_store(tmp_path / "same_dims", 100, {"old": 128, "side_info": 128, "new": 128})
    _refused(tmp_path, ["--data.train", str(same_dims), "--data.val", str(same_dims), "--data.dataset", "digits",
                        f"--model.old_checkpoint={digits / 'old' / 'best.ckpt'}"],
             "was embedded with the checkpoint of content ckpt-old")


def test_fct_fit_from_stores_runs_with_a_logger(stores, tmp_path):
    # a logger merges the datamodule's hparams with h's: the datamodule recorded dataset=None (the name is read
    # from the stores) against h's "synthetic", and Lightning stopped with "Error while merging hparams"
    train, val = stores
    art = tmp_path / "art"
    fit(["--stage", "transformation", "--data", "embeddings", "--data.train", str(train), "--data.val", str(val),
         "--artifacts", str(art), *TINY[:4], *SMALL_H, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir",
         str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"])
    assert (art / "synthetic" / "transformation" / "best.ckpt").is_file()
    (hparams,) = (tmp_path / "logs").rglob("hparams.yaml")
    assert "dataset: synthetic" in hparams.read_text()
