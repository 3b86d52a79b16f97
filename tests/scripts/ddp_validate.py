"""Run retrieval validation of a fixed toy stage on 101 random items with N CPU processes (gloo) and write
the logged metrics as JSON. Used by tests/test_ddp.py to check that any number of ranks gives exactly the
single-process numbers (DistributedSampler pads 101 items with duplicates; the callback must drop them).
``--index Flat`` adds the metrics through a FAISS index; ``--ties`` makes every item a copy of one of 20, so the
rankings are full of exact ties."""

import argparse
import json

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fct_lightning.retrieval.callback import RetrievalEvaluation
from fct_lightning.stages.base import RetrievalStage


class Items(Dataset):
    def __init__(self, n: int = 101, dim: int = 16, classes: int = 7, ties: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(classes, (n,), generator=g)
        if ties:
            self.x = self.x[torch.randint(20, (n,), generator=g)]

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
    p.add_argument("--index", default="none", help="RetrievalEvaluation(index=...): a FAISS factory string or none")
    p.add_argument("--ties", action="store_true", help="duplicated items: rankings full of exact ties")
    args = p.parse_args()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[RetrievalEvaluation(backend="torch", index=args.index)], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    items = Items(ties=args.ties)
    toy = Toy(args.nan_item)
    if args.nan_item is not None:
        toy._nan_x = items.x[args.nan_item]
    metrics = trainer.validate(toy, DataLoader(items, batch_size=8))[0]
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f)


if __name__ == "__main__":
    main()
