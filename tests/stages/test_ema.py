"""``--model.ema_decay``: h (or any stage) validated, selected and saved as the moving average of its weights."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging

from fct_lightning.callbacks import StageEMA
from fct_lightning.commands.fit import fit
from fct_lightning.stages import load_stage
from fct_lightning.stages.checkpoints import read_checkpoint
from tests.stages.test_chain import SMALL_H, TINY, chain  # noqa: F401  (the module's upstream chain)


def _h(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("h.")}


def test_h_is_validated_and_saved_as_its_average_and_resumes_with_both(chain, tmp_path):  # noqa: F811
    args = ["--stage", "transformation", "--artifacts", str(chain), *TINY, *SMALL_H, "--trainer.limit_train_batches",
            "4", "--model.ema_decay", "0.5", "--overwrite"]
    cli = fit(args)
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    folder = chain / "digits" / "transformation"
    last = read_checkpoint(folder / "last.ckpt", "transformation")
    best = read_checkpoint(folder / "best.ckpt", "transformation")
    average = {k[len("module."):]: v for k, v in ema._average_model.state_dict().items() if k.startswith("module.h.")}
    # the saved weights are the average (the training weights differ after 4 steps at decay 0.5), and neither they
    # nor the training weights kept to resume hold the frozen models (their own checkpoints do)
    assert set(best["state_dict"]) == set(average) and all(torch.equal(best["state_dict"][k], v)
                                                            for k, v in average.items())
    current = last["current_model_state"]
    assert set(current) == set(average) and any(not torch.equal(current[k], v) for k, v in average.items())
    assert all(k.startswith("h.") for k in last["state_dict"])
    # what fct-eval loads is the average
    module, _ = load_stage(folder / "best.ckpt", "transformation", ("transformation",), "digits")
    assert all(torch.equal(_h(module.state_dict())[k], v) for k, v in average.items())
    # resuming restores the training weights and the average, then goes on
    again = fit([*args[:-1], "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert again.trainer.current_epoch == 2
    assert read_checkpoint(folder / "last.ckpt", "transformation")["epoch"] == 1


def test_an_ema_decay_outside_0_1_is_refused(chain):  # noqa: F811
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        fit(["--stage", "transformation", "--artifacts", str(chain), *TINY, *SMALL_H, "--model.ema_decay", "1.0",
             "--overwrite"])


class _FrozenInput(pl.LightningModule):
    """A trained layer with BatchNorm behind a frozen one (as h behind the frozen old model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.BatchNorm1d(64)).eval()
        self.frozen.requires_grad_(False)
        self.trained = torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.BatchNorm1d(4))

    def train(self, mode: bool = True) -> _FrozenInput:
        super().train(mode)
        self.frozen.eval()
        return self

    def training_step(self, batch, batch_idx):
        return self.trained(self.frozen(batch[0])).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.trained.parameters(), lr=0.1)


def test_the_average_keeps_frozen_weights_exact_and_integer_buffers_counting(tmp_path):
    # Lightning's EMAWeightAveraging computed decay * avg + (1 - decay) * w for every tensor: frozen weights
    # drifted in their last bits (then swapped in for validation and copied back at the end), and BatchNorm's
    # num_batches_tracked was truncated back to its first value
    model = _FrozenInput()
    frozen = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(256, 8)), batch_size=16)
    ema = StageEMA(decay=0.999)
    trainer = pl.Trainer(max_epochs=2, callbacks=[ema], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    before = {k: v.clone() for k, v in model.trained.state_dict().items()}
    trainer.fit(model, data)
    average = ema._average_model.module
    for k, v in frozen.items():  # the model (the average copied back) and the average itself
        assert torch.equal(model.frozen.state_dict()[k], v), k
        assert torch.equal(average.frozen.state_dict()[k], v), k
    assert int(average.trained[1].num_batches_tracked) == 32 == int(model.trained[1].num_batches_tracked)
    # the trained tensors are averaged: at decay 0.999 over 32 steps the average stays near the start
    w0, w = before["0.weight"], model.trained[0].weight.detach()
    assert not torch.equal(w, w0) and (w - w0).abs().max() < 0.1
    assert ema._average_model.n_averaged == 32
