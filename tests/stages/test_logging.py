"""Training logs: step values only on Lightning's logging steps, exact batch-weighted epoch means."""

from __future__ import annotations

import csv

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from fct_lightning.data import DATAMODULES
from fct_lightning.stages import OldModel


class Recording(OldModel):
    """Remembers every training loss and batch size, to check the logged epoch mean against."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen.append((float(loss.detach()), len(batch[1])))
        return loss


def test_step_and_epoch_logs(tmp_path):
    dm = DATAMODULES["digits"](batch_size=100, train_classes=3)  # a few batches per epoch, the last one smaller
    model = Recording(classes=[0, 1, 2], in_channels=1, backbone="convnet", width=4)
    model.seen = []
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=2, limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(model, datamodule=dm)
    with open(next(tmp_path.glob("logs/*/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == list(range(1, len(model.seen), 2))  # every 2nd step (Lightning's schedule), no stale repeats
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    per_epoch = len(model.seen) // 2
    for e, logged in enumerate(epoch_losses):
        part = model.seen[e * per_epoch:(e + 1) * per_epoch]
        expected = sum(v * b for v, b in part) / sum(b for _, b in part)
        assert abs(logged - expected) < 1e-5
    assert len(epoch_losses) == 2 and len(part[-1:]) == 1 and part[-1][1] < 100  # the weighting mattered
    accs = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
