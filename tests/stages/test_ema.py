"""``--model.ema_decay``: h (or any stage) validated, selected and saved as the moving average of its weights."""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging

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
