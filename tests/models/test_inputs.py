"""A model's own input: the datamodule follows a pretrained backbone's size and normalisation unless they are set,
the checkpoint records what was served, and a frozen model fed another stage's batches converts them to its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fct_lightning.data.digits import DigitsDataModule
from fct_lightning.models import inputs
from fct_lightning.models.backbones import EmbeddingNet
from fct_lightning.models.inputs import InputSpec, convert
from fct_lightning.stages.base import serve_input
from fct_lightning.stages.checkpoints import read_checkpoint
from fct_lightning.stages.embedding import OldModel
from fct_lightning.stages.loading import load_stage
from tests.commands import fit_main
from tests.models.test_backbones_any import _fit_args

SMALL = InputSpec(8, (0.3,), (0.4,))
LARGE = InputSpec(16, (0.5,), (0.25,))


def _raw(n: int = 3, side: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0))


def test_convert_undoes_one_normalisation_resizes_and_applies_the_other():
    raw = _raw()
    served = (raw - 0.3) / 0.4
    want = (F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False, antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(convert(served, SMALL, LARGE), want)


def test_convert_makes_its_statistics_once_per_spec_and_device():
    """Each batch of an evaluation converted with the same specs reuses the statistics' tensors (no per-batch copy)."""
    inputs._channel_stats.cache_clear()
    served = (_raw() - 0.3) / 0.4
    first = convert(served, SMALL, LARGE)
    made = inputs._channel_stats.cache_info().misses
    torch.testing.assert_close(convert(served, SMALL, LARGE), first)
    info = inputs._channel_stats.cache_info()
    assert info.misses == made and info.hits >= 4


def test_statistics_first_made_in_inference_mode_serve_autograd_later():
    inputs._channel_stats.cache_clear()
    with torch.inference_mode():
        convert((_raw() - 0.3) / 0.4, SMALL, LARGE)
    x = ((_raw() - 0.3) / 0.4).requires_grad_(True)
    convert(x, SMALL, LARGE).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_network_converts_only_what_differs_from_its_own_input():
    torch.manual_seed(0)
    net = EmbeddingNet("convnet", 8, in_channels=1, width=4).eval()
    served = (_raw() - 0.3) / 0.4
    with torch.no_grad():
        plain = net(served)
        net.serve(SMALL)  # its own input unknown (a checkpoint from before inputs were recorded): nothing to do
        torch.testing.assert_close(net(served), plain)
        net.input_spec = LARGE
        net.serve(LARGE)
        assert net.served_input is None
        net.serve(SMALL)
        assert net.served_input == SMALL
        torch.testing.assert_close(net(served), net.embed(net.trunk(convert(served, SMALL, LARGE)).flatten(1)))
        assert not torch.allclose(net(served), plain)
    with pytest.raises(ValueError, match="trained on 1-channel images but is given 3-channel"):
        net.serve(InputSpec(8, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))


def _dm(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.trainer = SimpleNamespace(world_size=1, lightning_module=SimpleNamespace(
        preferred_input={"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.25,)}))
    return dm


def test_the_datamodule_follows_a_pretrained_backbone_unless_set():
    dm = _dm()
    dm.setup("fit")
    assert (dm.image_size, dm.mean, dm.std) == (16, (0.5,), (0.25,))
    assert next(iter(dm.train_dataloader()))[0].shape[-1] == 16
    dm = _dm(image_size=8, mean=[0.3], std=[0.4])
    dm.setup("fit")
    assert (dm.image_size, dm.mean, dm.std) == (8, (0.3,), (0.4,))
    with pytest.raises(ValueError, match="give both --data.mean and --data.std"):
        DigitsDataModule(mean=[0.3])
    with pytest.raises(ValueError, match="digits images have 1 channel"):
        DigitsDataModule(mean=[0.3, 0.3], std=[0.4, 0.4])


def test_only_pretrained_backbones_ask_for_their_input(tmp_path):
    assert OldModel([0, 1], backbone="shufflenet_v2_x0_5", in_channels=1).preferred_input is None  # from scratch
    torch.save(EmbeddingNet("shufflenet_v2_x0_5", 8, in_channels=1).trunk.state_dict(), tmp_path / "w.pt")
    wanted = OldModel([0, 1], backbone="shufflenet_v2_x0_5", in_channels=1, weights=str(tmp_path / "w.pt"))
    assert wanted.preferred_input["input_size"] == (1, 224, 224)


def test_a_pretrained_model_trains_on_its_input_and_is_served_the_chains(tmp_path):
    """fct-fit of a torchvision model with weights on digits: 224 px batches, recorded; rebuilt from the checkpoint,
    the model given the chain's 8 px digits batches embeds them as it would embed them at 224 px."""
    torch.save(EmbeddingNet("shufflenet_v2_x0_5", 16, in_channels=1).trunk.state_dict(), tmp_path / "w.pt")
    fit_main(_fit_args(tmp_path, "--model.backbone", "shufflenet_v2_x0_5", "--model.weights", str(tmp_path / "w.pt"),
                       "--model.embedding_dim", "16", "--data.batch_size", "8"))
    best = tmp_path / "art" / "digits" / "old" / "best.ckpt"
    recorded = read_checkpoint(best, "old")["fct"]["input"]
    assert recorded["image_size"] == 224 and len(recorded["mean"]) == 1
    model, _ = load_stage(best, "old", ("old",), "digits")
    assert model.net.input_spec == InputSpec.from_meta(recorded)
    chain_dm = DigitsDataModule()  # what fct-eval and h's training build: the dataset's own 8 px
    images = next(iter(chain_dm.eval_dataloader("test")))[0][:4]
    with torch.no_grad():
        own = model(convert(images, InputSpec.of(chain_dm), model.net.input_spec))
        unconverted = model(images)
        serve_input(model, chain_dm)
        torch.testing.assert_close(model(images), own)
    assert not torch.allclose(unconverted, own)
