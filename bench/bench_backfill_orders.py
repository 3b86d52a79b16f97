"""Backfilling orders from a head that predicts the *new* model's own loss on an item (issue 23, an experiment).

On the CIFAR-10 CPU recipe the oracle order "easiest for the new model first" (smallest cross-entropy of the new
classifier on the item's own new embedding) beat random backfilling in top-1 and mAP area, and FastFill's head tracked
that loss only loosely (Spearman 0.58; docs/results.md). This script asks whether a head trained for it does better:
an MLP on the standardised ``[old, side_info]`` (or ``old``) embeddings of the training store regresses
``log(1 + CE_new)``; on the test store its prediction orders the backfill both ways (``confident`` = smallest
predicted loss first, ``uncertainty`` = largest first), next to random (3 seeds) and, when the test store has
``<space>-uncertainty``, FastFill's own head. Areas are the mean over ``--points`` fractions (fct-eval's
``auc_mean``), leave-one-out on the test store.

    python bench/bench_backfill_orders.py --train TRAIN_STORE --test TEST_STORE --new_checkpoint new/best.ckpt \\
        [--space fct+side] [--out result.json]

TRAIN_STORE needs ``old``, ``side_info`` (with side-info), ``new`` and labels (``fct-embed --checkpoint old
--checkpoint side_info --checkpoint new --split train``); TEST_STORE the same plus the transformed ``--space``
(``fct-transform``). The new checkpoint gives the new classifier (its ``classifier.weight``, read weights-only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fct_lightning.backfill import BackfillContext, backfill_curves
from fct_lightning.evaluation_stores import read_space
from fct_lightning.store import Store, open_store


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by position: the scores here are continuous)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _labels(store: Store) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([store.labels(i) for i in range(len(store.shards))])).long()


def _space(store: Store, name: str) -> torch.Tensor:
    return torch.from_numpy(read_space(store, name, "bench_backfill_orders"))


def new_model_loss(store: Store, classifier: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per item, the new classifier's cross-entropy on the item's own new embedding."""
    return F.cross_entropy(_space(store, "new") @ classifier.T, labels, reduction="none")


def fit_head(x: torch.Tensor, target: torch.Tensor, epochs: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An MLP ``x -> target`` on inputs standardised with ``x``'s statistics (AdamW, batches of 512, MSE); returns
    the predictor of raw inputs ``[N, d] -> [N]`` (also used by bench_backfill_classes.py)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.ReLU(), torch.nn.Linear(512, 1))
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for b in torch.randperm(len(x)).split(512):
            loss = F.mse_loss(head(x[b]).squeeze(1), target[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()

    @torch.no_grad()
    def predict(z: torch.Tensor) -> torch.Tensor:
        return head((z - mu) / sd).squeeze(1)

    return predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--new_checkpoint", required=True)
    p.add_argument("--space", default="fct+side", help="the transformed gallery space of the test store")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    train, test = open_store(args.train), open_store(args.test)
    state = torch.load(args.new_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    classifier = state["classifier.weight"].float()
    y_train, y_test = _labels(train), _labels(test)
    loss_train, loss_test = new_model_loss(train, classifier, y_train), new_model_loss(test, classifier, y_test)
    inputs = ["old", "side_info"] if "+side" in args.space else ["old"]
    x_train = torch.cat([_space(train, s) for s in inputs], 1)
    x_test = torch.cat([_space(test, s) for s in inputs], 1)
    start = time.perf_counter()
    predicted = fit_head(x_train, torch.log1p(loss_train), args.epochs, args.seed)(x_test)  # the loss is heavy-tailed
    seconds = time.perf_counter() - start
    gallery, new = _space(test, args.space), _space(test, "new")
    out = backfill_curves(BackfillContext(gallery, new, y_test, predicted), ("random", "uncertainty", "confident"),
                          points=args.points, seeds=(0, 1, 2))
    row = {"random": out["random"]["auc_mean"], "new-loss head, largest first": out["uncertainty"]["auc_mean"],
           "new-loss head, smallest first": out["confident"]["auc_mean"],
           "spearman(head, new loss)": spearman(predicted, loss_test),
           "head fit s": seconds}
    if f"{args.space}-uncertainty" in test.spaces:
        u = _space(test, f"{args.space}-uncertainty")[:, 0]
        ff = backfill_curves(BackfillContext(gallery, new, y_test, u), ("uncertainty", "confident"),
                             points=args.points, seeds=(args.seed,))
        row["FastFill, most uncertain first"] = ff["uncertainty"]["auc_mean"]
        row["FastFill, least uncertain first"] = ff["confident"]["auc_mean"]
        row["spearman(FastFill, new loss)"] = spearman(u, loss_test)
    for name, value in row.items():
        shown = (f"top-1 {100 * value['top1']:.1f}  mAP {100 * value['map']:.1f}" if isinstance(value, dict)
                 else f"{value:.3f}")
        print(f"{name:34s} {shown}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
