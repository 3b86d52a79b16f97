"""The Compile callback: compiled training gives the same checkpoint keys and the same losses as eager."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from fct_lightning.callbacks import Compile
from fct_lightning.data import DATAMODULES
from fct_lightning.stages import OldModel


def _fit(tmp_path, callbacks):
    pl.seed_everything(0)
    dm = DATAMODULES["digits"](batch_size=64, train_classes=2)
    model = OldModel(classes=[0, 1], in_channels=1, backbone="convnet", width=4, embedding_dim=8)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=callbacks, deterministic=True)
    trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.slow  # compiling on 2 CPU cores takes tens of seconds
def test_compiled_training_matches_eager(tmp_path):
    eager, _ = _fit(tmp_path / "eager", [])
    cb = Compile()
    compiled, _ = _fit(tmp_path / "compiled", [cb])
    assert cb.compiled == ["net"] and compiled.net._compiled_call_impl is not None
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints load either way
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_compile_names_missing_modules(tmp_path):
    with pytest.raises(ValueError, match=r"none of the submodules \['backbone'\] on OldModel"):
        _fit(tmp_path, [Compile(modules=["backbone"])])


def test_compile_without_a_compiler_says_what_to_install(tmp_path, monkeypatch):
    from fct_lightning import callbacks

    monkeypatch.setattr(callbacks.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C/C.. compiler on PATH"):
        _fit(tmp_path, [Compile()])
