"""External old models: TorchScript and torch.export files with a sidecar, embedded by fct-embed (store and .npy forms)
into the vectors the module itself computes; pickled modules, unpinned or changed files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fct_lightning.data.decode import load_image
from fct_lightning.gallery.embed import embed, external_view
from fct_lightning.gallery.store_embed import embed_store
from fct_lightning.models.external import ExternalModelError, archive_format, load_external, sha256, sidecar_path
from fct_lightning.store import open_store
from tests.data.fakes import make_imagefolder

SIZE = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TRAINER = {"accelerator": "cpu", "devices": 1}


class TinyNet(nn.Module):
    """A small convnet: [B, 3, H, W] -> [B, 6]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def write_sidecar(path: Path, **overrides) -> Path:
    spec = {"sha256": sha256(path), "image_size": SIZE, "mean": MEAN, "std": STD, "role": "old", **overrides}
    sidecar_path(path).write_text(json.dumps(spec))
    return path


def save(net: nn.Module, path: Path, kind: str) -> Path:
    x = torch.randn(3, 3, SIZE, SIZE)
    if kind == "script":
        torch.jit.script(net).save(str(path))
    elif kind == "trace":
        torch.jit.trace(net, x).save(str(path))
    else:
        program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.export.save(program, str(path))
    return write_sidecar(path)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 3 classes x 3 images of 20 px (resized to 16 by the view), in sub-folders
    return make_imagefolder(tmp_path_factory.mktemp("imgs"), classes=3, splits={"train": 3}, size=20) / "train"


def expected(net: nn.Module, folder: Path) -> tuple[list[str], np.ndarray]:
    """The module's own outputs on the images, read as the sidecar says (resize, crop, scale, normalise)."""
    paths = sorted(p for p in folder.rglob("*.jpg"))
    view = external_view({"image_size": SIZE, "mean": MEAN, "std": STD, "in_channels": 3})
    with torch.no_grad():
        out = net(torch.stack([view(load_image(str(p))) for p in paths]))
    return [str(p.relative_to(folder)) for p in paths], out.numpy()


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_embed_file_and_store_equal_the_module(kind, net, folder, tmp_path):
    model = save(net, tmp_path / ("model.pt2" if kind == "export" else f"model.{kind}.pt"), kind)
    assert archive_format(model) == ("export" if kind == "export" else "torchscript")
    ids, want = expected(net, folder)

    out = embed(model, tmp_path / "emb.npy", images=folder, batch_size=4, device="cpu")  # 9 items: last batch of 1
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "emb.json").read_text())
    assert meta["stage"] == "old" and meta["digest"] == sha256(model)[:16]
    assert meta["external"]["sha256"] == sha256(model)
    assert [json.loads(line) for line in (tmp_path / "emb.ids.txt").read_text().splitlines()] == ids

    store = embed_store([model], tmp_path / "store", images=folder, batch_size=4, trainer=TRAINER)
    st = open_store(store)
    space = st.space("old")
    assert space.role == "old" and space.checkpoint_digest == sha256(model)[:16] and space.dim == 6
    assert st.ids(0) == ids
    np.testing.assert_allclose(st.array("old", 0), want, rtol=1e-5, atol=1e-6)


def test_role_from_sidecar(net, folder, tmp_path):
    model = write_sidecar(save(net, tmp_path / "m.pt2", "export"), role="side_info", normalized=True)
    st = open_store(embed_store([model], tmp_path / "store", images=folder, trainer=TRAINER))
    assert list(st.spaces) == ["side_info"] and st.space("side_info").normalized


def test_pickled_module_refused(net, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(net, path)
    write_sidecar(path)
    with pytest.raises(ExternalModelError, match="pickled nn.Module"):
        load_external(path)


def test_unpinned_or_changed_file_refused(net, tmp_path):
    model = save(net, tmp_path / "model.ts", "script")
    write_sidecar(model, sha256="0" * 64)
    with pytest.raises(ExternalModelError, match="changed since it was trusted"):
        load_external(model)
    sidecar_path(model).write_text(json.dumps({"image_size": SIZE, "mean": MEAN, "std": STD}))
    with pytest.raises(ExternalModelError, match="must pin"):
        load_external(model)
    sidecar_path(model).unlink()
    with pytest.raises(ExternalModelError, match="without its sidecar"):
        load_external(model)
    write_sidecar(model, mean=[0.5, 0.5])
    with pytest.raises(ExternalModelError, match="mean"):
        load_external(model)


def test_external_needs_images(net, tmp_path):
    model = save(net, tmp_path / "model.ts", "script")
    with pytest.raises(ValueError, match="--images"):
        embed(model, tmp_path / "e.npy", split="test", device="cpu")
    with pytest.raises(ValueError, match="--images"):
        embed_store([model], tmp_path / "s", split="test", trainer=TRAINER)


def test_export_pickle_path_is_refused(net, tmp_path, monkeypatch):
    """torch.export.load's own pickle.loads (constants saved as pickles) does not run while loading."""
    from fct_lightning.models import external

    model = save(net, tmp_path / "m.pt2", "export")
    seen = []

    def load_module(path, data, kind):
        with external._no_pickle():
            from torch.export.pt2_archive import _package

            with pytest.raises(ExternalModelError, match="pickled constant"):
                _package.pickle.loads(b"cos\nsystem\n(S'true'\ntR.")
            seen.append(torch.load.__name__)
            with pytest.raises(Exception, match="Weights only load failed"):
                import io
                import pickle

                torch.load(io.BytesIO(pickle.dumps(TinyNet())), weights_only=False)
        return original(path, data, kind)

    original = external._load_module
    monkeypatch.setattr(external, "_load_module", load_module)
    assert load_external(model).embedding_dim == 6 and seen


# ----------------------------------------------------------------- BCT without the old classifier: class means
RUN = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
       "--trainer.logger", "false", "--trainer.enable_model_summary", "false", "--model.width", "8"]


@pytest.fixture(scope="module")
def digits_old(tmp_path_factory) -> Path:
    from fct_lightning.commands.fit import fit

    art = tmp_path_factory.mktemp("bct")
    fit(["--stage", "old", "--artifacts", str(art), *RUN])
    return art


def bct_weight(art: Path) -> torch.Tensor:
    ckpt = torch.load(art / "digits" / "bct" / "best.ckpt", weights_only=True)
    assert bool(ckpt["state_dict"]["old_weight_ready"])
    return ckpt["state_dict"]["old_weight"]


def test_bct_class_means_from_store(digits_old, tmp_path):
    from fct_lightning.commands.fit import fit

    old = digits_old / "digits" / "old" / "best.ckpt"
    store = embed_store([old], tmp_path / "store", split="train", trainer=TRAINER)
    st = open_store(store)
    emb = np.concatenate([st.array("old", i) for i in range(len(st.shards))]).astype(np.float64)
    lab = np.concatenate([st.labels(i) for i in range(len(st.shards))])
    want = np.stack([emb[lab == c].mean(0) for c in range(10)])
    fit(["--stage", "bct", "--artifacts", str(digits_old), *RUN, "--model.old_classifier", "class_means",
         "--model.old_store", str(store)])
    np.testing.assert_allclose(bct_weight(digits_old).numpy(), want, rtol=1e-5, atol=1e-6)
    meta = torch.load(digits_old / "digits" / "bct" / "best.ckpt", weights_only=True)["fct"]
    assert meta["old_classifier"] == "class_means" and meta["old_store"] == str(store)


def test_bct_class_means_from_training_images(digits_old):
    from fct_lightning.commands.fit import fit
    from fct_lightning.data import DATAMODULES
    from fct_lightning.stages.loading import load_stage

    fit(["--stage", "bct", "--artifacts", str(digits_old), *RUN, "--model.old_classifier", "class_means",
         "--overwrite"])
    old, _ = load_stage(digits_old / "digits" / "old" / "best.ckpt", "old", ("old",))
    dm = DATAMODULES["digits"](val_fraction=0.1)  # configs/digits/data.yaml's: the training items BCT saw
    dm.setup("fit")
    with torch.no_grad():
        pairs = [(old.net(x), y) for x, y, _ in dm.eval_dataloader("train")]
    emb, lab = torch.cat([p[0] for p in pairs]).double(), torch.cat([p[1] for p in pairs])
    want = torch.stack([emb[lab == c].mean(0) for c in range(10)]).float()
    torch.testing.assert_close(bct_weight(digits_old), want, rtol=1e-5, atol=1e-5)


def test_bct_class_means_refuses_a_store_of_another_model(digits_old, net, folder, tmp_path):
    from fct_lightning.stages.bct import BCTModel

    with pytest.raises(ValueError, match="old_classifier='class_means'"):
        BCTModel(list(range(10)), old_store="x")
    with pytest.raises(ValueError, match="old_classifier='nope'"):
        BCTModel(list(range(10)), old_classifier="nope")
    model = write_sidecar(save(net, tmp_path / "m.pt2", "export"))
    store = embed_store([model], tmp_path / "store", images=folder, trainer=TRAINER)
    bct = BCTModel(list(range(10)), old_checkpoint=str(digits_old / "digits" / "old" / "best.ckpt"),
                   old_classifier="class_means", old_store=str(store), in_channels=1, backbone="convnet", width=8)
    bct.setup("fit")
    with pytest.raises(ValueError, match="dimension mismatch: the stored old embedding is 6-d"):
        bct.class_mean_rows()
