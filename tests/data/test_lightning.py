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


def _fit_probe(dm, epochs, **kwargs):
    model = _Probe()
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0, **kwargs)
    return model, trainer


@pytest.mark.parametrize("in_memory", [False, True])
def test_resumed_run_continues_the_shuffle_order(tmp_path, in_memory):
    """Epoch 2 after a resume from epoch 1's checkpoint sees epoch 2's order, not a replay of epoch 0's."""
    def dm():
        return DigitsDataModule(batch_size=32, train_classes=5, in_memory_gpu=in_memory, seed=3)

    whole, trainer = _fit_probe(dm(), 3, enable_checkpointing=False)
    trainer.fit(whole, datamodule=dm())
    order = {e: [] for e in range(3)}
    for e, idx in whole.seen:
        order[e] += idx
    assert order[0] != order[1] != order[2]

    first, trainer = _fit_probe(dm(), 2, default_root_dir=tmp_path)
    trainer.fit(first, datamodule=dm())
    assert [i for e, idx in first.seen if e == 1 for i in idx] == order[1]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    resumed, trainer = _fit_probe(dm(), 3, default_root_dir=tmp_path)
    trainer.fit(resumed, datamodule=dm(), ckpt_path=str(ckpt))
    assert [e for e, _ in resumed.seen] == [2, 2]
    assert [i for _, idx in resumed.seen for i in idx] == order[2]


def test_per_item_training_loader_reads_as_shuffled_for_ddp():
    """Lightning gives DDP a shuffling DistributedSampler only when it reads the training loader as shuffled."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _is_dataloader_shuffled
    from torch.utils.data import DataLoader

    dm = DigitsDataModule(batch_size=32, train_classes=5)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"):  # what Lightning wraps train_dataloader() in
        train, val = dm.train_dataloader(), dm.val_dataloader()
    assert _is_dataloader_shuffled(train)
    assert not _is_dataloader_shuffled(val)


def test_hand_loop_without_set_epoch_reshuffles_each_pass():
    dm = DigitsDataModule(batch_size=400, train_classes=5, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = (next(iter(loader))[2].tolist() for _ in range(2))
    assert first != second
    again = DigitsDataModule(batch_size=400, train_classes=5, seed=1)
    again.setup("fit")
    assert next(iter(again.train_dataloader()))[2].tolist() == first  # the seed fixes the order


def test_set_epoch_also_fixes_the_worker_base_seed():
    """Worker processes are seeded from a draw on the loader's generator: a resumed epoch draws that epoch's."""
    def loader():
        dm = DigitsDataModule(batch_size=32, train_classes=5, seed=2)
        dm.setup("fit")
        return dm.train_dataloader()

    straight = loader()
    seeds = []
    for epoch in range(3):
        straight.sampler.set_epoch(epoch)
        seeds.append(iter(straight)._base_seed)
    resumed = loader()
    resumed.sampler.set_epoch(2)
    assert iter(resumed)._base_seed == seeds[2] and len(set(seeds)) == 3


def test_ranks_without_workers_draw_their_own_augmentation():
    """seed_everything gives every DDP rank the same global generator; without workers the per-item training
    augmentation draws from it, so each rank's loader re-seeds it with its rank (one process: untouched)."""
    from types import SimpleNamespace

    def first_draw(rank, world):
        dm = DigitsDataModule(batch_size=32, train_classes=5)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        torch.manual_seed(7)
        dm.train_dataloader()
        return torch.rand(3)

    torch.manual_seed(7)
    untouched = torch.rand(3)
    assert torch.equal(first_draw(0, 1), untouched)
    assert not torch.equal(first_draw(0, 2), first_draw(1, 2))
