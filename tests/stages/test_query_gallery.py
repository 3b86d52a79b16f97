"""fct-eval with separate query and gallery sets (the `folder` dataset's query/ and gallery/ folders)."""

from __future__ import annotations

import json

import pytest
import torch

from fct_lightning.commands.fit import fit
from fct_lightning.data import DATAMODULES
from fct_lightning.retrieval.evaluate import evaluate
from fct_lightning.stages import load_stage
from tests.commands import eval_main
from tests.data.fakes import make_imagefolder

SMALL = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.logger", "false", "--trainer.enable_model_summary", "false", "--data.num_workers", "0",
         "--data.image_size", "16", "--data.batch_size", "16", "--data.eval_batch_size", "16"]
NET = ["--model.backbone", "convnet", "--model.width", "8"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("qg")
    root = make_imagefolder(base / "data", 6, {"train": 4, "val": 2, "query": 2, "gallery": 3}, size=16)
    art = base / "art"
    common = ["--dataset", "folder", "--artifacts", str(art), "--data.root", str(root), *SMALL]
    for stage in ("old", "side_info", "new", "bct"):
        fit(["--stage", stage, *common, *NET])
    for extra in ([], ["--model.use_side_info", "false"], ["--model.uncertainty", "true"]):
        fit(["--stage", "transformation", *common, "--model.mixer_width", "32", "--model.cache_views", "1", *extra])
    return root, art


def test_folder_splits_include_the_extra_folders(chain):
    root, _ = chain
    dm = DATAMODULES["folder"](root=str(root))
    assert dm.splits == ("train", "val", "gallery", "query")
    with pytest.raises(ValueError, match="eval_split='nope' is not a split of folder"):
        DATAMODULES["folder"](root=str(root), eval_split="nope")


def test_queries_from_one_split_gallery_from_another(chain, tmp_path):
    root, art = chain
    out = tmp_path / "qg.json"
    eval_main(["--dataset", "folder", "--artifacts", str(art), "--data_root", str(root), "--no_wandb",
               "--query_split", "query", "--gallery_split", "gallery", "--out", str(out),
               "--backfill", "random,uncertainty,distance", "--points", "3", "--backfill_seeds", "1"])
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert (meta["split"], meta["query_split"], meta["n_items"], meta["n_queries"]) == ("gallery", "query", 18, 12)
    assert set(res["cases"]) >= {"old/old", "new/new", "new/old", "bct/old", "fct/old", "fct+side/old"}
    assert {"fct+side random", "fct+side uncertainty", "fct+side distance"} <= set(res["backfill"])
    # new/new by hand: the new model's query-split embeddings ranked against its gallery-split ones, nothing excluded
    module, _ = load_stage(art / "folder" / "new" / "best.ckpt", "new", ("new",), "folder")
    dm = DATAMODULES["folder"](root=str(root), image_size=16, eval_batch_size=16)

    def embed(split):
        xs, ys = zip(*[(module.query_embed(x), y) for x, y, _ in dm.eval_dataloader(split)], strict=True)
        return torch.cat(xs), torch.cat(ys)

    with torch.no_grad():
        (q, qy), (g, gy) = embed("query"), embed("gallery")
    want = evaluate(q, qy, g, gy, exclude_self=False)
    for metric in ("top1", "top5", "map", "map@r"):
        assert res["cases"]["new/new"][metric] == pytest.approx(want[metric], abs=1e-5)
    # the backfilling curve at 100 % is new/new over these queries and gallery
    assert res["backfill"]["fct+side distance"]["curves"]["map"][-1] == pytest.approx(want["map"], abs=1e-4)


def test_split_arguments_are_checked(chain, tmp_path):
    root, art = chain
    base = ["--dataset", "folder", "--artifacts", str(art), "--data_root", str(root), "--no_wandb"]
    with pytest.raises(SystemExit, match="give both --query_split and --gallery_split"):
        eval_main([*base, "--query_split", "query"])
    with pytest.raises(SystemExit, match="query_split='nope' is not a split of folder"):
        eval_main([*base, "--query_split", "nope", "--gallery_split", "gallery", "--out", str(tmp_path / "x.json")])


def test_eval_reads_the_folders_training_used(tmp_path):
    """`make folder EXTRA="--data.eval_dir test"` passes the folder name to the trainings only: fct-eval takes it
    (and the image size) from the stage configs, instead of looking for a val/ folder that is not there."""
    root = make_imagefolder(tmp_path / "data", 4, {"train": 4, "test": 2}, size=16)
    art = tmp_path / "art"
    common = ["--dataset", "folder", "--artifacts", str(art), "--data.root", str(root), "--data.eval_dir", "test",
              *SMALL, *NET]
    for stage in ("old", "new"):
        fit(["--stage", stage, *common])
    out = tmp_path / "eval.json"
    eval_main(["--dataset", "folder", "--artifacts", str(art), "--data_root", str(root), "--no_wandb",
               "--cases", "old/old,new/new,new/old", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"]["n_items"] == 8 and set(res["cases"]) == {"old/old", "new/new", "new/old"}


def test_a_class_inserted_in_the_tree_is_refused_and_one_appended_is_not(tmp_path):
    """Labels are class indices in folder order: a class folder that sorts before the old model's classes would
    re-label them under BCT, fct-eval and a resume; one that sorts after them keeps every index."""
    import shutil

    from fct_lightning.stages.checkpoints import CheckpointError

    root = make_imagefolder(tmp_path / "data", ["c0", "c1", "c2", "c3"], {"train": 4, "val": 2}, size=16)
    art = tmp_path / "art"
    common = ["--dataset", "folder", "--artifacts", str(art), "--data.root", str(root), *SMALL, *NET]
    fit(["--stage", "old", *common])
    for split in ("train", "val"):  # grown at the end: still the same classes at the same indices
        shutil.copytree(root / split / "c3", root / split / "z_new")
    fit(["--stage", "bct", *common])
    for split in ("train", "val"):  # a folder that sorts first: every index moves
        shutil.copytree(root / split / "c0", root / split / "a_new")
    with pytest.raises(CheckpointError, match=r"another class list .*index 0: 'c0' then, 'a_new' now"):
        fit(["--stage", "bct", *common, "--overwrite"])
    with pytest.raises(CheckpointError, match="another class list"):
        fit(["--stage", "old", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    with pytest.raises(SystemExit, match="another class list"):
        eval_main(["--dataset", "folder", "--artifacts", str(art), "--data_root", str(root), "--no_wandb",
                   "--cases", "old/old"])
