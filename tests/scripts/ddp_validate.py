"""Run retrieval validation of a fixed toy stage on 101 random items with N CPU processes (gloo) and write
the logged metrics as JSON. Used by tests/test_ddp.py to check that any number of ranks gives exactly the
single-process numbers (DistributedSampler pads 101 items with duplicates; the callback must drop them)."""

import argparse
import json

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages.base import RetrievalStage


class Items(Dataset):
    def __init__(self, n: int = 101, dim: int = 16, classes: int = 7) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


class Toy(RetrievalStage):
    stage = "toy"

    def __init__(self, nan_item: int | None = None) -> None:
        super().__init__(dataset="toy")
        self.nan_item = nan_item
        g = torch.Generator().manual_seed(1)
        self.register_buffer("a", torch.randn(16, 8, generator=g))
        self.register_buffer("b", torch.randn(16, 8, generator=g))

    @property
    def eval_cases(self):
        return {"b/a": ("b", "a"), "a/a": ("a", "a")}

    def eval_embeddings(self, x):
        b = x @ self.b + 0.5 * x @ self.a
        if self.nan_item is not None:  # a diverged model: NaN in one item's embedding (on whichever rank holds it)
            b = torch.where((x == self._nan_x).all(1, keepdim=True), torch.full_like(b, float("nan")), b)
        return {"a": x @ self.a, "b": b}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--nan_item", type=int, default=None, help="make this item's 'b' embedding NaN")
    args = p.parse_args()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[RetrievalEvaluation(backend="torch")], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    items = Items()
    toy = Toy(args.nan_item)
    if args.nan_item is not None:
        toy._nan_x = items.x[args.nan_item]
    metrics = trainer.validate(toy, DataLoader(items, batch_size=8))[0]
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f)


if __name__ == "__main__":
    main()
