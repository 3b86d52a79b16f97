"""What FastFill's uncertainty tracks, per class and per item, and how oracle orders compare (issue 23, an analysis).

For one chain's FastFill h's (``fastfill``, and ``fastfill_noside`` when trained), on the evaluation split
(leave-one-out, new-model queries):

* per class: the head's mean predicted log-variance ``u``, the top-1 of the transformed gallery and of new/new, and
  h's squared error ``||new - h||^2``; then Spearman's correlation over the classes of ``u`` with new/new's top-1
  (how confusable the class is for the *new* model), with the top-1 that full backfilling adds to the class, and
  with h's error;
* per item: Spearman's correlation of ``u`` with the new classifier's cross-entropy on the item's own new embedding,
  with h's squared error, and with the cross-entropy that backfilling removes (``CE(h) - CE(new)``);
* backfilling areas (mean over ``--points`` fractions, top-1 / mAP): random (3 seeds), FastFill's order
  (``uncertainty``), ``confident``, and three oracles that read the new embeddings: ``distance`` (largest h error
  first), ``gain`` (largest ``CE(h) - CE(new)`` first) and ``easy`` (smallest ``CE(new)`` first);
* with ``--reducible_head``: a deployable stand-in for ``gain``, an MLP fitted on the training split's ``[old,
  side_info]`` (or ``old``) embeddings to the cross-entropy that backfilling removes there, ``CE(h) - CE(new)``,
  ordering the evaluation split by its prediction, largest first (``reducible``).

    python bench/bench_backfill_classes.py --artifacts artifacts --dataset cifar10 --data_root D [--out result.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench_backfill_orders import fit_head, spearman  # the sibling script (bench/ is the script's path)
from fct_lightning.backfill import BackfillContext, backfill_curves, transform_features
from fct_lightning.evaluation import run_eval
from fct_lightning.retrieval.compat import top1_correct
from fct_lightning.retrieval.evaluate import evaluate_queries
from fct_lightning.runs import stage_dir
from fct_lightning.stages.base import serve_input
from fct_lightning.stages.loading import load_stage


def top1(query: Tensor, gallery: Tensor, labels: Tensor) -> Tensor:
    """Per query, whether its leave-one-out top-1 in ``gallery`` is of its class."""
    return top1_correct(evaluate_queries(query, labels, gallery, labels, exclude_self=True)).float()


def cross_entropy(x: Tensor, labels: Tensor, classifier: tuple[Tensor, Tensor | None]) -> Tensor:
    """Per item, the new classifier's cross-entropy on ``x``."""
    weight, bias = classifier
    return F.cross_entropy(x @ weight.T + (0 if bias is None else bias), labels, reduction="none")


def analyse(emb: dict[str, Tensor], classifier: tuple[Tensor, Tensor | None], points: int,
            reducible: Tensor | None = None) -> dict:
    t, n, y, u = emb["transformed"].float(), emb["new"].float(), emb["labels"], emb["uncertainty"].float()

    def ce(x: Tensor) -> Tensor:
        return cross_entropy(x, y, classifier)

    ce_h, ce_new, err = ce(t), ce(n), (n - t).pow(2).sum(1)
    hit_t, hit_n = top1(n, t, y), top1(n, n, y)
    classes = [int(c) for c in y.unique()]
    per_class = {c: {"u": float(u[y == c].mean()), "top1 fct": float(hit_t[y == c].mean()),
                     "top1 new": float(hit_n[y == c].mean()), "h error": float(err[y == c].mean())}
                 for c in classes}
    col = {k: torch.tensor([per_class[c][k] for c in classes]) for k in ("u", "top1 fct", "top1 new", "h error")}
    ctx = BackfillContext(t, n, y, u)
    policies = ["random", "uncertainty", "confident", "distance"]
    fixed = {"gain": (torch.sort(ce_h - ce_new, descending=True, stable=True).indices, True),
             "easy": (torch.sort(ce_new, stable=True).indices, True)}
    if reducible is not None:
        fixed["reducible"] = (torch.sort(reducible, descending=True, stable=True).indices, False)
    curves = backfill_curves(ctx, policies, points=points, seeds=(0, 1, 2), orders=fixed)
    return {
        "per_class": per_class,
        "spearman_over_classes": {"u vs new/new top-1": spearman(col["u"], col["top1 new"]),
                                  "u vs top-1 added by backfilling": spearman(col["u"],
                                                                             col["top1 new"] - col["top1 fct"]),
                                  "u vs h error": spearman(col["u"], col["h error"])},
        "spearman_over_items": {"u vs CE(new)": spearman(u, ce_new), "u vs h error": spearman(u, err),
                                "u vs CE(h) - CE(new)": spearman(u, ce_h - ce_new),
                                **({} if reducible is None else
                                   {"reducible head vs CE(h) - CE(new)": spearman(reducible, ce_h - ce_new)})},
        "areas": {o: {m: curves[o]["auc_mean"][m] for m in ("top1", "map")} for o in [*policies, *fixed]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data_root", default=None)
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--reducible_head", action="store_true",
                   help="also fit a head to the training split's CE(h) - CE(new) and order by it")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    art = Path(args.artifacts)
    r = run_eval(args.dataset, art, cases=("old/old", "new/new", "side/side"), data_root=args.data_root)
    dm, feats, (_, labels) = r["_datamodule"], r["_features"], r["_embeddings"]
    state = torch.load(stage_dir(art, args.dataset, "new") / "best.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    classifier = (state["classifier.weight"].float(), state.get("classifier.bias"))
    train = None
    if args.reducible_head:  # the frozen models' features of the training split (no augmentation)
        tr = run_eval(args.dataset, art, cases=("old/old", "new/new", "side/side"), data_root=args.data_root,
                      split="train")
        train = (tr["_features"], tr["_embeddings"][1])
    out = {}
    for folder in ("fastfill", "fastfill_noside"):
        path = stage_dir(art, args.dataset, folder) / "best.ckpt"
        if not path.is_file():
            continue
        module, _ = load_stage(path, folder, ("transformation",), args.dataset)
        serve_input(module, dm)
        digest = {role: d for role, (d, _) in module.frozen_models().items()}
        side = feats[digest["side"]] if "side" in digest else None
        emb = transform_features(module, feats[digest["old"]], side, feats[digest["new"]], labels)
        reducible = None
        if train is not None:
            tf, ty = train
            tside = tf[digest["side"]] if "side" in digest else None
            temb = transform_features(module, tf[digest["old"]], tside, tf[digest["new"]], ty)
            target = (cross_entropy(temb["transformed"].float().cpu(), ty.cpu(), classifier)
                      - cross_entropy(temb["new"].float().cpu(), ty.cpu(), classifier))
            parts = ["old"] + (["side"] if "side" in digest else [])
            x_train = torch.cat([tf[digest[r]].float().cpu() for r in parts], 1)
            x_test = torch.cat([feats[digest[r]].float().cpu() for r in parts], 1)
            reducible = fit_head(x_train, target, epochs=20, seed=0)(x_test)
        out[folder] = res = analyse({k: v.cpu() for k, v in emb.items()}, classifier, args.points, reducible)
        print(f"== {folder}")
        for c, row in res["per_class"].items():
            print(f"  class {c}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
        for key in ("spearman_over_classes", "spearman_over_items"):
            print(f"  {key}: " + ", ".join(f"{k} {v:+.2f}" for k, v in res[key].items()))
        for o, a in res["areas"].items():
            print(f"  {o:12s} top-1 {100 * a['top1']:.2f}  mAP {100 * a['map']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
