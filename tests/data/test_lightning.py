"""The datamodules under a real Lightning Trainer and LightningCLI-style argument parsing."""

import pytest
import pytorch_lightning as pl
import torch

from fct_lightning.data import DATAMODULES, DigitsDataModule


class _Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.current_epoch, idx.tolist()))
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y, _idx = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("in_memory", [False, True])
def test_fit_two_epochs(in_memory):
    dm = DigitsDataModule(batch_size=64, train_classes=5, in_memory_gpu=in_memory)
    model = _Probe()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    epochs = [e for e, _ in model.seen]
    assert epochs == [0, 0, 0, 1, 1, 1]
    assert model.seen[0][1] != model.seen[3][1]  # reshuffled every epoch
    if in_memory:
        assert trainer.train_dataloader.epoch == 2  # Lightning's set_epoch(1) reached the loader, then iterated


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_signatures_parse_with_jsonargparse(name):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DATAMODULES[name], "data")
    cfg = parser.parse_args(["--data.batch_size=7", "--data.train_classes=[1, 2]", "--data.views=2"])
    assert cfg.data.batch_size == 7 and cfg.data.train_classes == [1, 2] and cfg.data.views == 2
    cfg = parser.parse_args(["--data.train_classes=5"])
    assert cfg.data.train_classes == 5 and isinstance(cfg.data.train_classes, int)
    assert parser.parse_args(["--data.train_classes=0.5"]).data.train_classes == 0.5
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--data.no_such_option=1"])
