"""The per-step checks that a GPU defers (finite loss, labels inside the model's classes), exercised on CPU."""

from __future__ import annotations

import pytest
import torch

from fct_lightning.stages import NewModel, OldModel


class DeferringOld(OldModel):
    defer_checks_on_cpu = True
    deferred_check_every = 3


def test_deferred_check_keeps_the_first_step(monkeypatch):
    m = DeferringOld(classes=[0, 1], in_channels=1, backbone="convnet", width=4)
    steps = iter([4, 5, 6])
    monkeypatch.setattr(type(m), "global_step", property(lambda self: next(steps)))
    m.check_loss(torch.tensor(1.0), "old cross-entropy")
    m.check_loss(torch.tensor(float("nan")), "old cross-entropy")
    m.check_loss(torch.tensor(float("nan")), "old cross-entropy")
    with pytest.raises(FloatingPointError, match="loss of old cross-entropy became NaN or infinite at step 5;"):
        m.raise_deferred()
    m.raise_deferred()  # read back once: nothing is pending afterwards


def test_deferred_label_check(monkeypatch):
    m = DeferringOld(classes=[0, 1], in_channels=1, backbone="convnet", width=4)
    monkeypatch.setattr(type(m), "global_step", property(lambda self: 7))
    rows = m.check_rows(torch.tensor([0, 1, 1]))
    assert rows.tolist() == [0, 1, 1]
    m.raise_deferred()
    rows = m.check_rows(torch.tensor([1, 3, -2]))
    assert rows.tolist() == [1, 0, 0]  # clamped until the check is read back
    with pytest.raises(ValueError, match="at step 7: a training batch has labels outside the model's classes"):
        m.raise_deferred()


def test_immediate_label_check_on_cpu_names_the_labels():
    m = NewModel(classes=[0, 2], in_channels=1, backbone="convnet", width=4)
    assert m.rows_of(torch.tensor([2, 0, 1, 9, -1])).tolist() == [1, 0, -1, -1, -1]
    with pytest.raises(ValueError, match=r"labels \[1, 9\] outside the model's classes \[0, 2\]"):
        m.check_rows(torch.tensor([0, 1, 9]))


def test_deferred_nan_stops_training_before_the_next_validation(tmp_path):
    """End to end: a NaN loss under deferred checking still stops fit() with the clear message."""
    import pytorch_lightning as pl

    from fct_lightning.data import DATAMODULES

    class NaNAfter(DeferringOld):
        def training_step(self, batch, batch_idx):
            images = batch[0]
            loss = self.classifier(self.net(images)).sum() * (float("nan") if batch_idx == 1 else 1.0)
            self.check_loss(loss, "old cross-entropy")
            return loss

    dm = DATAMODULES["digits"](batch_size=64, train_classes=2)
    model = NaNAfter(classes=[0, 1], in_channels=1, backbone="convnet", width=4)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="at step 1;"):
        trainer.fit(model, datamodule=dm)


def test_deferred_checks_are_read_back_even_when_nothing_asks():
    """A hand-written loop never calls raise_deferred: the kept values are read every 4 x deferred_check_every."""
    m = DeferringOld(classes=[0, 1], in_channels=1, backbone="convnet", width=4)
    m.check_loss(torch.tensor(float("inf")), "old cross-entropy")
    for _ in range(4 * m.deferred_check_every - 2):
        m.check_loss(torch.tensor(1.0), "old cross-entropy")
    with pytest.raises(FloatingPointError, match="at step 0;"):
        m.check_loss(torch.tensor(1.0), "old cross-entropy")
    assert not m.__dict__.get("_deferred")  # nothing left over to raise twice
