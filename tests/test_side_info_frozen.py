"""Side-info without training: a frozen pretrained trunk reduced by PCA (equal to scikit-learn's) or a seeded random
projection, written to best.ckpt, reloaded identically, and taken by the transformation stage as its side-info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from fct_lightning.commands.fit import fit
from fct_lightning.data import DATAMODULES
from fct_lightning.models.backbones import SmallConvNet
from fct_lightning.stages.loading import load_stage
from fct_lightning.stages.side_info import SideInfoModel, pca_from_moments, random_projection

DIM, WIDTH = 6, 8  # the convnet's feature is 2 * WIDTH = 16-d
RUN = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
       "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
TINY = [*RUN, "--model.width", str(WIDTH)]


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = x.double()
    return x.T @ x, x.sum(0), len(x)


def test_pca_equals_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)
    comps, mean, explained = pca_from_moments(*moments(torch.from_numpy(x)), 4)
    ref = PCA(n_components=4, svd_solver="full").fit(x)
    signs = np.sign((comps.numpy() * ref.components_).sum(1))
    np.testing.assert_allclose(comps.numpy() * signs[:, None], ref.components_, atol=1e-8)
    np.testing.assert_allclose(mean.numpy(), ref.mean_, atol=1e-10)
    assert explained == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-9)
    projected = (torch.from_numpy(x) - mean) @ comps.T
    np.testing.assert_allclose(np.abs(projected.numpy()), np.abs(ref.transform(x)), atol=1e-8)
    assert bool((comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all())  # the sign is fixed by the data
    with pytest.raises(ValueError, match="embedding_dim=11"):
        pca_from_moments(*moments(torch.from_numpy(x)), 11)


def test_random_projection_is_seeded():
    a, b, c = random_projection(16, 6, 3), random_projection(16, 6, 3), random_projection(16, 6, 4)
    assert a.shape == (6, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.var().item() == pytest.approx(1 / 6, rel=0.5)


def test_options_are_checked():
    with pytest.raises(ValueError, match="side_source='nope'"):
        SideInfoModel(in_channels=1, backbone="convnet", side_source="nope")
    with pytest.raises(ValueError, match="reduce='svd'"):
        SideInfoModel(in_channels=1, backbone="convnet", side_source="frozen", reduce="svd")
    with pytest.raises(ValueError, match="head='mlp'"):
        SideInfoModel(in_channels=1, backbone="convnet", side_source="frozen", head="mlp")
    model = SideInfoModel(in_channels=1, backbone="convnet", width=WIDTH, embedding_dim=DIM, side_source="frozen")
    assert model.trainable_parameters() == [] and model.projection is None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' convnet trunk: random weights with moved BatchNorm statistics, saved as a state dict."""
    torch.manual_seed(1)
    net = SmallConvNet(1, WIDTH)
    with torch.no_grad():
        net.train()
        net(torch.randn(64, 1, 8, 8) * 3 + 1)
    path = tmp_path_factory.mktemp("weights") / "trunk.pt"
    torch.save(net.state_dict(), path)
    return path, net.eval()


@pytest.fixture(scope="module")
def chain(pretrained, tmp_path_factory):
    art = tmp_path_factory.mktemp("art")
    frozen = ["--model.side_source", "frozen", "--model.backbone", "convnet", "--model.weights", str(pretrained[0]),
              "--model.embedding_dim", str(DIM), "--data.views", "1"]
    fit(["--stage", "side_info", "--artifacts", str(art), *TINY, *frozen, "--model.reduce", "pca"])
    fit(["--stage", "side_info", "--artifacts", str(art / "random"), *TINY, *frozen, "--model.reduce", "random",
         "--model.projection_seed", "5"])
    return art


def train_features(net: torch.nn.Module) -> torch.Tensor:
    dm = DATAMODULES["digits"](train_classes=5, val_fraction=0.1)  # configs/digits/data.yaml's training items
    dm.setup("fit")
    with torch.no_grad():
        return torch.cat([net(x) for x, _, _ in dm.eval_dataloader("train", classes=list(range(5)))])


def test_frozen_pca_checkpoint(chain, pretrained):
    path = chain / "digits" / "side_info" / "best.ckpt"
    assert path.is_file()
    module, meta = load_stage(path, "side_info", ("side_info",))
    assert meta["side_source"] == "frozen" and meta["reduce"] == "pca" and 0 < meta["explained_variance"] <= 1
    trunk = pretrained[1]
    for k, v in trunk.state_dict().items():  # the trunk is the pretrained file's, untouched
        torch.testing.assert_close(module.net.trunk.state_dict()[k], v)
    feats = train_features(trunk).numpy().astype(np.float64)
    ref = PCA(n_components=DIM, svd_solver="full").fit(feats)
    w = module.net.embed.weight.detach().double().numpy()
    signs = np.sign((w * ref.components_).sum(1))
    np.testing.assert_allclose(w * signs[:, None], ref.components_, atol=1e-4)
    assert meta["explained_variance"] == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-4)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        z = module.query_embed(x)
        want = (trunk(x).double() - torch.from_numpy(ref.mean_)) @ torch.from_numpy(ref.components_ * signs[:, None]).T
        torch.testing.assert_close(z.double(), want, atol=1e-4, rtol=1e-4)
        again, _ = load_stage(path, "side_info", ("side_info",))
        assert torch.equal(again.query_embed(x), z)  # reloads and embeds identically


def test_frozen_random_checkpoint(chain, pretrained):
    module, meta = load_stage(chain / "random" / "digits" / "side_info" / "best.ckpt", "side_info", ("side_info",))
    assert meta["reduce"] == "random" and meta["explained_variance"] is None
    torch.testing.assert_close(module.net.embed.weight, random_projection(2 * WIDTH, DIM, 5).float())
    assert module.projection_seed == 5


def test_a_checkpoint_of_the_old_seed_name_loads(chain, tmp_path):
    ckpt = torch.load(chain / "random" / "digits" / "side_info" / "best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["seed"] = ckpt["hyper_parameters"].pop("projection_seed")  # as written before the rename
    old = tmp_path / "side_info" / "best.ckpt"
    old.parent.mkdir()
    torch.save(ckpt, old)
    module, _ = load_stage(old, "side_info", ("side_info",))
    assert module.projection_seed == 5
    assert not module.net.embed.bias.any()


def test_transformation_takes_frozen_side_info(chain):
    args = ["--artifacts", str(chain), *TINY]
    fit(["--stage", "old", *args])
    fit(["--stage", "new", *args])
    fit(["--stage", "transformation", "--artifacts", str(chain), *RUN, "--model.cache_views", "1",
         "--model.mixer_width", "16"])
    ckpt = torch.load(chain / "digits" / "transformation" / "best.ckpt", weights_only=True)
    side = load_stage(chain / "digits" / "side_info" / "best.ckpt", "side_info", ("side_info",))[1]
    assert ckpt["fct"]["side_info_digest"] == side["digest"]
