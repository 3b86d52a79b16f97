"""Any backbone: torchvision by name, timm, any nn.Module class; weights from files, hub weights offline; freezing
and a lower backbone learning rate. Everything on generated images; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import urllib.error
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fct_lightning.models.backbones import EmbeddingNet
from fct_lightning.stages.embedding import OldModel
from fct_lightning.stages.loading import load_stage
from fct_lightning.stages.side_info import SideInfoModel
from tests.commands import fit_main

HERE = __name__  # class paths of the test backbones below


class TinyNet(nn.Module):
    """A user's own backbone: conv, pool, flatten -> [B, width]."""

    def __init__(self, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)


class PooledMapNet(TinyNet):
    """Returns [B, F, 1, 1] (not flattened): the embedding net flattens it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class FeatureMapNet(TinyNet):
    """Returns an unpooled [B, F, H, W] map: not a pooled feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def images(n: int = 4, side: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------- the own names stay bit-for-bit
# Regression pins: sha256 (first 16 hex digits) over the state dict's keys and float32 bytes, in order, right after
# torch.manual_seed(0) and construction. Computed with the code before "any backbone" (git HEAD of issue 21) by this
# same digest(); the digits demo and the recipes must keep giving the same initial weights for the same seed.
OWN_PINS = [
    (dict(backbone="resnet18", embedding_dim=128, in_channels=3, cifar_stem=True), "2f22594286892857"),
    (dict(backbone="resnet18", embedding_dim=64, in_channels=3, cifar_stem=False), "960b02bfbb15075d"),
    (dict(backbone="convnet", embedding_dim=128, in_channels=1, width=32), "284d81076201f6d8"),
]


@pytest.mark.parametrize(("kwargs", "pin"), OWN_PINS, ids=["resnet18-cifar", "resnet18", "convnet"])
def test_own_backbones_initialise_as_before(kwargs, pin):
    torch.manual_seed(0)
    assert digest(EmbeddingNet(**kwargs)) == pin


def test_own_stages_initialise_as_before():
    torch.manual_seed(0)
    old = OldModel(classes=[0, 1, 2, 3, 4], in_channels=1, backbone="convnet", width=8, embedding_dim=16)
    assert digest(old) == "4684dc565c9d7d64"  # same procedure as OWN_PINS
    torch.manual_seed(0)
    side = SideInfoModel(in_channels=3, backbone="resnet18", cifar_stem=True, embedding_dim=32)
    assert digest(side) == "3eca03ef9c4992b5"


# ----------------------------------------------------------------- the families
@pytest.mark.parametrize(("name", "feature_dim", "head"), [
    ("mobilenet_v3_small", 1024, "classifier.3."),
    ("shufflenet_v2_x0_5", 1024, "fc."),
    ("squeezenet1_1", 512, "classifier.1."),
    ("efficientnet_b0", 1280, "classifier.1."),
])
def test_torchvision_by_name(name, feature_dim, head):
    net = EmbeddingNet(name, embedding_dim=24).eval()
    assert (net.backbone_family, net.feature_dim, net.head_prefixes) == ("torchvision", feature_dim, (head,))
    with torch.no_grad():
        assert net(images(3, 64)).shape == (3, 24)
        assert net.trunk(images(2, 64)).shape == (2, feature_dim)  # the pooled feature, no classifier
    assert net.data_config["input_size"] == (3, 224, 224)
    assert net.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_torchvision_grey_images_and_cifar_stem():
    grey = EmbeddingNet("mobilenet_v3_small", 8, in_channels=1).eval()
    with torch.no_grad():
        assert grey(images(2, 32, channels=1)).shape == (2, 8)
    assert grey.data_config["input_size"] == (1, 224, 224) and grey.data_config["mean"] is None
    stem = EmbeddingNet("resnext50_32x4d", 8, cifar_stem=True)
    assert stem.trunk.conv1.kernel_size == (3, 3) and isinstance(stem.trunk.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="cifar_stem=True applies to ResNet-style"):
        EmbeddingNet("mobilenet_v3_small", 8, cifar_stem=True)


@pytest.mark.parametrize(("name", "feature_dim"), [("timm:resnet10t", 512), ("timm:mobilenetv3_small_050", 1024)])
def test_timm(name, feature_dim):
    pytest.importorskip("timm")
    net = EmbeddingNet(name, embedding_dim=16).eval()
    assert (net.backbone_family, net.feature_dim) == ("timm", feature_dim)
    with torch.no_grad():
        assert net(images(2, 32)).shape == (2, 16)
    assert set(net.data_config) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}


@pytest.mark.parametrize("spec", [f"{HERE}.TinyNet", {"class_path": f"{HERE}.TinyNet", "init_args": {"width": 8}},
                                  TinyNet(width=8), {"class_path": f"{HERE}.PooledMapNet"}])
def test_class_path(spec):
    net = EmbeddingNet(spec, embedding_dim=5, head="mlp")
    assert (net.backbone_family, net.feature_dim) == ("class", 8)
    assert net(images(4, 32)).shape == (4, 5)
    assert isinstance(net.embed, nn.Sequential)


@pytest.mark.parametrize(("spec", "message"), [
    ({"class_path": f"{HERE}.FeatureMapNet"}, r"must return a pooled feature \[B, F\].*returned \(2, 8, 64, 64\)"),
    ("no_such_pkg.Net", "cannot be imported"),
    (f"{HERE}.digest", "is not an nn.Module class"),
    ({"class_path": f"{HERE}.TinyNet", "init_args": {"depth": 3}}, "cannot be built with init_args"),
])
def test_class_path_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingNet(spec, 4)


@pytest.mark.parametrize(("name", "close"), [("mobilenet_v3_smal", "mobilenet_v3_small"), ("resnet19", "resnet18"),
                                             ("convnett", "convnet")])
def test_unknown_name_lists_close_names(name, close):
    with pytest.raises(ValueError, match=f"backbone='{name}' is not known; did you mean .*{close}") as err:
        EmbeddingNet(name, 4)
    assert "\n" not in str(err.value)


def test_unknown_timm_name_lists_close_timm_names():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="did you mean .*timm:resnet10t"):
        EmbeddingNet("timm:resnet10", 4)


# ----------------------------------------------------------------- weights from files
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_loads_into_the_backbone(tmp_path, suffix):
    torch.manual_seed(1)
    source = EmbeddingNet("mobilenet_v3_small", 8)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    else:
        torch.save(source.trunk.state_dict(), path)
    torch.manual_seed(2)
    loaded = EmbeddingNet("mobilenet_v3_small", 8, weights=str(path))
    assert digest(loaded.trunk) == digest(source.trunk)
    assert digest(EmbeddingNet("mobilenet_v3_small", 8)) != digest(source)  # a random one differs


def test_weights_of_a_whole_classifier_model_drop_its_classifier(tmp_path):
    full = torchvision.models.shufflenet_v2_x0_5(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "full.pth")
    net = EmbeddingNet("shufflenet_v2_x0_5", 8, weights=str(tmp_path / "full.pth"))
    want = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    got = net.trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    other = TinyNet(width=8).state_dict()
    torch.save(other, tmp_path / "tiny.pt")
    with pytest.raises(ValueError) as err:
        EmbeddingNet("shufflenet_v2_x0_5", 8, weights=str(tmp_path / "tiny.pt"))
    message = str(err.value)
    assert "missing keys" in message and "conv1.0.weight" in message
    assert "unexpected keys" in message and "conv.weight" in message and "\n" not in message
    wrong_shape = EmbeddingNet(f"{HERE}.TinyNet", 4).trunk.state_dict()
    wrong_shape["conv.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): conv.weight \(8, 3, 5, 5\) in the file"):
        EmbeddingNet(f"{HERE}.TinyNet", 4, weights=str(tmp_path / "shape.pt"))


class _Payload:
    """Unpickling an instance of a class like this one could run code: the weights-only load must refuse it."""


def test_weights_files_are_read_weights_only(tmp_path):
    torch.save({"conv.weight": torch.zeros(1), "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be read as a weights-only state dict"):
        EmbeddingNet(f"{HERE}.TinyNet", 4, weights=str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="no such file"):
        EmbeddingNet(f"{HERE}.TinyNet", 4, weights=str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------- hub weights, offline
def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_hub_weights_offline_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", _offline)
    for kwargs in (dict(backbone="mobilenet_v3_small", pretrained=True), dict(backbone="resnet18", weights="DEFAULT"),
                   dict(backbone="shufflenet_v2_x0_5", weights="IMAGENET1K_V1")):
        with pytest.raises(ValueError, match=r"could not be downloaded \(offline\?\).*pass --model.weights PATH") as e:
            EmbeddingNet(embedding_dim=4, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="has no such weights; choose one of"):
        EmbeddingNet("mobilenet_v3_small", 4, weights="IMAGENET9K")
    with pytest.raises(ValueError, match="convnet has no pretrained weights"):
        EmbeddingNet("convnet", 4, pretrained=True)


def test_timm_hub_weights_offline(monkeypatch):
    timm = pytest.importorskip("timm")
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(ValueError, match=r"timm:resnet10t could not be downloaded \(offline\?\)") as err:
        EmbeddingNet("timm:resnet10t", 4, pretrained=True)
    assert "\n" not in str(err.value)


def test_hub_weights_of_a_stage_load_when_fitting_only(monkeypatch):
    """Building a stage (as rebuilding it from its checkpoint does) downloads nothing; fitting it does."""
    calls = []
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict",
                        lambda self, **kw: calls.append(str(self)) or _offline())
    model = OldModel([0, 1], backbone="shufflenet_v2_x0_5", pretrained=True, embedding_dim=8)
    assert calls == [] and model.data_config["input_size"] == (3, 224, 224)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="could not be downloaded"):
        trainer.fit(model, train_dataloaders=_loader(channels=3))
    assert calls == ["ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1"]


# ----------------------------------------------------------------- freezing, lower learning rate, training
def _loader(n: int = 8, side: int = 32, channels: int = 3) -> DataLoader:
    x = images(n, side, channels)
    y = torch.arange(n) % 2
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=4)


def _fit(model: pl.LightningModule, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(model, train_dataloaders=_loader())
    return trainer


def test_frozen_backbone_keeps_file_weights_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(3)
    source = EmbeddingNet("mobilenet_v3_small", 8)
    torch.save(source.trunk.state_dict(), tmp_path / "w.pt")
    model = OldModel([0, 1], backbone="mobilenet_v3_small", weights=str(tmp_path / "w.pt"), freeze_backbone=True,
                     embedding_dim=8, optimizer="adamw", lr=0.01)
    assert not any(p.requires_grad for p in model.net.trunk.parameters())
    model.train()
    assert not any(m.training for m in model.net.trunk.modules()) and model.net.embed.training
    head_before = model.net.embed.weight.detach().clone()
    trainer = _fit(model)
    assert digest(model.net.trunk) == digest(source.trunk)  # loaded at fit start, then untouched (BN buffers too)
    assert not torch.equal(model.net.embed.weight, head_before)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 1 and all(not any(p is q for q in model.net.trunk.parameters()) for p in groups[0]["params"])


def test_backbone_lr_scale_makes_a_second_group():
    model = OldModel([0, 1], backbone=f"{HERE}.TinyNet", embedding_dim=8, backbone_lr_scale=0.1, lr=0.2,
                     warmup_epochs=0)
    trainer = _fit(model, steps=1)
    head, backbone = trainer.optimizers[0].param_groups
    assert (head["name"], backbone["name"]) == ("head", "backbone")
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.net.trunk.parameters()}
    assert backbone["initial_lr"] == pytest.approx(0.1 * head["initial_lr"]) and head["initial_lr"] == 0.2
    assert len(OldModel([0, 1], backbone="convnet", in_channels=1).param_groups()) == 1  # unchanged without it
    with pytest.raises(ValueError, match="backbone_lr_scale=0.0 must be positive"):
        OldModel([0, 1], backbone="convnet", backbone_lr_scale=0.0)


def test_instance_backbone_checkpoint_stays_weights_only(tmp_path):
    model = OldModel([0, 1], backbone=TinyNet(width=8), embedding_dim=8, dataset="gen")
    trainer = _fit(model, steps=1)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    loaded, _ = load_stage(tmp_path / "old.ckpt", "old", ("old",))
    assert digest(loaded.net) == digest(model.net)


# ----------------------------------------------------------------- through fct-fit's LightningCLI
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false"]
ONE_BATCH = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]


def _fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--stage", "old", "--dataset", "digits", "--artifacts", str(tmp_path / "art"), *QUIET, *ONE_BATCH, *extra]


def test_cli_class_path_with_init_args(tmp_path):
    from fct_lightning.commands.fit import build_cli

    spec = json.dumps({"class_path": f"{HERE}.TinyNet", "init_args": {"in_channels": 1, "width": 6}})
    cli, _ = build_cli(_fit_args(tmp_path, "--model.backbone", spec, "--model.head", "mlp"))
    assert isinstance(cli.model.net.trunk, TinyNet) and cli.model.net.feature_dim == 6
    assert cli.model.hparams["backbone"] == {"class_path": f"{HERE}.TinyNet", "init_args": {"in_channels": 1,
                                                                                             "width": 6}}
    cli, _ = build_cli(_fit_args(tmp_path, "--model.backbone", f"{HERE}.TinyNet", "--model.backbone.in_channels", "1"))
    assert isinstance(cli.model.net.trunk, TinyNet)


def test_fct_fit_with_a_torchvision_backbone_and_a_weights_file(tmp_path):
    torch.manual_seed(4)
    source = EmbeddingNet("shufflenet_v2_x0_5", 16, in_channels=1)
    torch.save(source.trunk.state_dict(), tmp_path / "w.pt")
    cli = fit_main(_fit_args(tmp_path, "--model.backbone", "shufflenet_v2_x0_5", "--model.weights",
                             str(tmp_path / "w.pt"), "--model.freeze_backbone", "true", "--model.embedding_dim", "16"))
    best = tmp_path / "art" / "digits" / "old" / "best.ckpt"
    assert best.is_file() and digest(cli.model.net.trunk) == digest(source.trunk)
    (tmp_path / "w.pt").unlink()  # rebuilding the trained model reads no weights file
    loaded, _ = load_stage(best, "old", ("old",), "digits")
    assert digest(loaded.net.trunk) == digest(source.trunk)


def test_fct_fit_bad_weights_one_line_nothing_written(tmp_path):
    torch.save(TinyNet(in_channels=1).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(SystemExit) as err:
        fit_main(_fit_args(tmp_path, "--model.backbone", "shufflenet_v2_x0_5", "--model.weights",
                           str(tmp_path / "tiny.pt")))
    first = str(err.value.code).splitlines()[0]
    assert first.startswith("fct-fit: the weights") and "missing keys" in first and "unexpected keys" in first
    assert not any((tmp_path / "art").rglob("*.ckpt")) and not any((tmp_path / "art").rglob("config.yaml"))
