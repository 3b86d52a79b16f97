"""The transformation stage: learn h(old embedding, side-info) -> new embedding, with every model frozen.

After training, the stored gallery (old embeddings + side-info) is mapped into the new model's space without
touching an image: ``gallery_embed`` = h(old(x), side(x)) and ``query_embed`` = new(x).

Two ways to train h: ``cached=True`` (default) embeds ``cache_views`` seeded augmentations of every training
image once with the three frozen models (see :mod:`fct_lightning.data.features`) and trains on those
tensors; ``cached=False`` runs the three frozen backbones on freshly augmented images every step, as the FCT
reference does. FastFill's uncertainty head is an option (``uncertainty=True``).

A third way needs no image and no frozen model: from stored embeddings (``stored``, given by
:class:`~fct_lightning.data.embeddings.EmbeddingsDataModule`; ``fct-fit --data embeddings``). h's dimensions and the
digests its checkpoint records come from the stores' spaces, training batches have the feature cache's form and
validation batches carry the stored embeddings of the validation items, so the checkpoint and the logged cases are
those of the image path. Frozen checkpoints may still be given (their digests and dimensions must be the stores'):
the image models then come with h (fct-eval on images), and the new model's classifier serves FastFill's
discriminative term.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fct_lightning.data.features import (
    FeatureBatches,
    build_or_load,
    cache_key,
    embed_views,
)
from fct_lightning.losses import SIMILARITY_REDUCTIONS, fastfill_loss, transformation_loss
from fct_lightning.models.transformation import Transformation
from fct_lightning.stages.base import RetrievalStage, freeze
from fct_lightning.stages.loading import load_stage

FROZEN = ("old_net", "side_net", "new_net", "new_classifier")


class TransformationModel(RetrievalStage):
    """Trains h on frozen old, side-info and new models (stage ``transformation``).

    Args:
        old_checkpoint: The old model's checkpoint (default ``artifacts/<dataset>/old/best.ckpt``); optional with
            ``stored``. A ``new`` stage's checkpoint is accepted too: in a chain of model versions (``fct-versions``)
            the new model of one update is the old model of the next. It may not be ``new_checkpoint`` itself.
        side_info_checkpoint: The side-info model's checkpoint (``.../side_info/best.ckpt``).
        new_checkpoint: The new model's checkpoint (``.../new/best.ckpt``); optional with ``stored``.
        use_side_info: h(old, side) when True; the no-side-info variant h(old) when False (case ``fct/old``).
        loss: ``mse`` or ``cosine`` distance to the new model's embedding.
        mixer_width: Width of h's mixer layers.
        mixer_depth: Number of hidden mixer layers.
        branch_width_factor: Hidden width of h's input branches as a multiple of their input size.
        bn_eval_after: Fraction of the epochs after which h's BatchNorm layers switch to eval mode
            (the reference does this for the second half); 1.0 never switches.
        cached: Train on cached features (default) instead of recomputing the frozen models every step.
        cache_views: Augmented views per training image in the cache.
        cache_dir: Where caches live (default ``artifacts/<dataset>/cache``).
        cache_dtype: Storage dtype of cached features (``float16`` or ``float32``).
        cache_seed: Seed of the cached augmentations.
        uncertainty: Add FastFill's uncertainty head and train with its loss.
        fastfill_similarity: FastFill's similarity term (per-item MSE).
        fastfill_similarity_reduction: ``mean`` (default) or ``sum`` of that term's squared errors over the
            embedding's dimensions (``sum`` = the paper's squared L2 distance, weighed like the discriminative term);
            see :func:`~fct_lightning.losses.fastfill_loss`.
        fastfill_discriminative: FastFill's discriminative term (the frozen new classifier on h's output).
        label_smoothing: Label smoothing of the discriminative term.
        optimizer: ``sgd`` or ``adamw`` (AdamW by default here).
        lr: Peak learning rate.
        stored: Train from stored embeddings instead of images: by role (``old``, ``side_info``, ``new``) the
            stored space's ``dim``, ``digest`` (of the checkpoint that embedded it, or None) and ``source`` (linked
            from :attr:`EmbeddingsDataModule.stored <fct_lightning.data.embeddings.EmbeddingsDataModule.stored>`).
        **kwargs: The dataset name (linked by the CLI; checked against the checkpoints) and the other optimiser
            settings of :class:`~fct_lightning.stages.base.RetrievalStage`.
    """

    stage = "transformation"
    frozen_prefixes = FROZEN

    def __init__(
        self,
        old_checkpoint: str | None = None,
        new_checkpoint: str | None = None,
        side_info_checkpoint: str | None = None,
        use_side_info: bool = True,
        loss: str = "mse",
        mixer_width: int = 2048,
        mixer_depth: int = 2,
        branch_width_factor: int = 2,
        bn_eval_after: float = 0.5,
        cached: bool = True,
        cache_views: int = 10,
        cache_dir: str | None = None,
        cache_dtype: str = "float16",
        cache_seed: int = 0,
        uncertainty: bool = False,
        fastfill_similarity: bool = True,
        fastfill_similarity_reduction: str = "mean",
        fastfill_discriminative: bool = True,
        label_smoothing: float = 0.1,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        stored: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, lr=lr, **kwargs)
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss={loss!r} is not known; choose 'mse' or 'cosine'.")
        if cache_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"cache_dtype={cache_dtype!r}; choose float16, bfloat16 or float32.")
        if cache_views < 1:
            raise ValueError(f"cache_views={cache_views} must be at least 1.")
        self.save_hyperparameters()
        self.loss_kind, self.use_side_info, self.bn_eval_after = loss, use_side_info, bn_eval_after
        self.cached, self.cache_views, self.cache_seed = cached, cache_views, cache_seed
        self.stored = stored
        if stored is None and not (old_checkpoint and new_checkpoint):
            raise ValueError("training h on images needs old_checkpoint and new_checkpoint (fct-fit fills in "
                             "<artifacts>/<dataset>/{old,new}/best.ckpt); to train it from stored embeddings instead, "
                             "use fct-fit --data embeddings --data.train STORE --data.val STORE")
        self.cache_dir = (Path(cache_dir) if cache_dir else
                          Path(old_checkpoint).resolve().parent.parent / "cache" if old_checkpoint else None)
        self.cache_dtype = getattr(torch, cache_dtype)
        self.uncertainty = uncertainty
        if fastfill_similarity_reduction not in SIMILARITY_REDUCTIONS:
            raise ValueError(f"fastfill_similarity_reduction={fastfill_similarity_reduction!r} is not known; choose "
                             f"from {SIMILARITY_REDUCTIONS}")
        self.fastfill_terms = (fastfill_similarity, fastfill_discriminative)
        self.similarity_reduction = fastfill_similarity_reduction
        self.label_smoothing = label_smoothing
        dataset = self.dataset
        dims: dict[str, int | None] = {"old": None, "new": None, "side_info": None}
        self.old_meta: dict[str, Any] = {}
        self.new_meta: dict[str, Any] = {}
        self.side_meta: dict[str, Any] = {}
        self.new_classes: list[Any] | None = None
        if old_checkpoint and new_checkpoint and Path(old_checkpoint).resolve() == Path(new_checkpoint).resolve():
            raise ValueError(f"old_checkpoint and new_checkpoint are the same file ({old_checkpoint}): h would map a "
                             "model onto itself. Pass the deployed (old) model's best.ckpt as old_checkpoint.")
        if old_checkpoint:  # the old role: an old model, or the new model of an earlier update (version chains)
            old, self.old_meta = load_stage(old_checkpoint, "old", ("old", "new"), dataset)
            self.old_net = freeze(old.net)
            dims["old"] = old.embedding_dim
        if new_checkpoint:
            new, self.new_meta = load_stage(new_checkpoint, "new", ("new",), dataset)
            self.new_net = freeze(new.net)
            self.new_classifier = freeze(new.classifier)
            self.new_classes = list(new.classes)
            self.register_buffer("new_class_to_row", new.class_to_row.clone(), persistent=False)
            dims["new"] = new.embedding_dim
        if use_side_info:
            if not side_info_checkpoint and stored is None:
                raise ValueError("use_side_info=True needs side_info_checkpoint (or set use_side_info=False)")
            if side_info_checkpoint:
                side, self.side_meta = load_stage(side_info_checkpoint, "side_info", ("side_info",), dataset)
                self.side_net = freeze(side.net)
                dims["side_info"] = side.embedding_dim
        if stored is not None:
            dims = self._use_stored(stored, dims)
        self.h = Transformation(
            dims["old"], dims["new"], dims["side_info"] if use_side_info else None, branch_width_factor, mixer_width,
            mixer_depth, uncertainty
        )

    def _use_stored(self, stored: dict[str, dict[str, Any]], dims: dict[str, int | None]) -> dict[str, int | None]:
        """h's dimensions from the stored spaces; a frozen checkpoint given as well must be the one that embedded
        its space (same content digest, when the space records one; same dimension). Roles without a checkpoint
        get the space's digest, which the checkpoint of h records (fct-transform checks a store's spaces by it)."""
        roles = ["old", "new"] + (["side_info"] if self.use_side_info else [])
        missing = [r for r in roles if r not in stored]
        if missing:
            fix = (" (or train h without side-info: --model.use_side_info false)" if missing == ["side_info"] else "")
            raise ValueError(f"the stored embeddings have no space {' or '.join(map(repr, missing))}; h with these "
                             f"options needs {roles}{fix}")
        if self.uncertainty and self.fastfill_terms[1] and self.new_classes is None:
            raise ValueError("FastFill's discriminative term classifies h's outputs with the new model's classifier, "
                             "which stored embeddings do not hold: give --model.new_checkpoint (the checkpoint that "
                             "embedded the 'new' space) or turn the term off (--model.fastfill_discriminative false)")
        metas = {"old": self.old_meta, "new": self.new_meta, "side_info": self.side_meta}
        for role in roles:
            space, meta = stored[role], metas[role]
            if dims[role] is not None and dims[role] != space["dim"]:
                raise ValueError(f"dimension mismatch: the stored {role} space {space.get('source')} is "
                                 f"{space['dim']}-d but the {role} checkpoint {meta['path']} embeds {dims[role]}-d; "
                                 "give the checkpoint that embedded the space, or none")
            if meta and space.get("digest") and space["digest"] != meta["digest"]:
                raise ValueError(f"the stored {role} space {space.get('source')} was embedded with the checkpoint of "
                                 f"content {space['digest']}, but the {role} checkpoint {meta['path']} is "
                                 f"{meta['digest']}; give the checkpoint that embedded the space, or none")
            if not meta:
                metas[role].update(digest=space.get("digest"), path=space.get("source"), embedding_dim=space["dim"])
            dims[role] = space["dim"]
        return dims

    # ----------------------------------------------------------------- frozen parts
    @property
    def gallery_space(self) -> str:
        return "fct+side" if self.use_side_info else "fct"

    def frozen_inputs(self) -> dict[str, dict[str, Any]]:
        return {"old": self.old_meta, "new": self.new_meta, "side_info": self.side_meta}

    def fct_metadata(self) -> dict[str, Any]:
        meta = super().fct_metadata()
        meta.update(use_side_info=self.use_side_info, uncertainty=self.uncertainty)
        meta.update(old_digest=self.old_meta["digest"], new_digest=self.new_meta["digest"],
                    side_info_digest=self.side_meta.get("digest"))
        meta.update(embedding_dim=self.new_meta.get("embedding_dim"), h=self.h.config)
        return meta

    # ----------------------------------------------------------------- embeddings
    def check_image_models(self) -> None:
        """Refuse to embed images with an h trained from stored embeddings whose image models were not given."""
        need = ["old", "new"] + (["side_info"] if self.use_side_info else [])
        absent = [r for r, net in zip(need, ("old_net", "new_net", "side_net"), strict=False) if not hasattr(self, net)]
        if absent:
            raise ValueError(f"this h was trained from stored embeddings without the {', '.join(absent)} image "
                             "model(s), so it cannot embed images: transform stored embeddings (fct-transform "
                             "--store), or train it with --model.<role>_checkpoint given for every role")

    def frozen_embeddings(self, images: Tensor, new: bool = True) -> dict[str, Tensor]:
        """The frozen models' embeddings of ``images``: ``old``, ``side`` (with side-info) and ``new`` (if asked)."""
        self.check_image_models()
        with torch.no_grad():
            out = {"old": self.old_net(images)}
            if new:
                out["new"] = self.new_net(images)
            if self.use_side_info:
                out["side"] = self.side_net(images)
        return out

    def frozen_models(self) -> dict[str, tuple[str, torch.nn.Module]]:
        """The frozen image models by role (``old``, ``side`` with side-info, ``new``), each with the digest of the
        checkpoint file it came from: two stages that loaded the same file hold the same model."""
        self.check_image_models()
        out = {"old": (self.old_meta["digest"], self.old_net), "new": (self.new_meta["digest"], self.new_net)}
        if self.use_side_info:
            out["side"] = (self.side_meta["digest"], self.side_net)
        return out

    def transform(self, old: Tensor, side: Tensor | None = None) -> Tensor:
        """h(old, side) -> new-space embedding (side is None for the no-side-info variant)."""
        return self.h(old, side if self.use_side_info else None)

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        f = self.frozen_embeddings(images)
        return {"old": f["old"], "new": f["new"], self.gallery_space: self.transform(f["old"], f.get("side"))}

    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        return {f"{self.gallery_space}/old": ("new", self.gallery_space), "old/old": ("old", "old"),
                "new/new": ("new", "new")}

    def query_embed(self, images: Tensor) -> Tensor:
        self.check_image_models()
        return self.new_net(images)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Images as every stage validates them, or stored embeddings (a dict batch from
        :class:`~fct_lightning.data.embeddings.EmbeddingsDataModule`): the same spaces, from the stored rows."""
        if not isinstance(batch, dict):
            return super().validation_step(batch, batch_idx)
        old, side = batch["old"], batch.get("side")
        embeddings = {"old": old, "new": batch["new"], self.gallery_space: self.transform(old, side)}
        return {"embeddings": embeddings, "labels": batch["labels"], "index": batch["index"]}

    def gallery_embed(self, images: Tensor) -> Tensor:
        f = self.frozen_embeddings(images, new=False)
        return self.transform(f["old"], f.get("side"))

    # ----------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        """Cached mode: build (or load) the feature cache and make the datamodule serve it.

        This runs in ``setup`` because Lightning asks for the training dataloader before ``on_fit_start``
        (to count the steps of the learning-rate schedule) and keeps that first loader: swapping it later
        would leave h training on images through the frozen models, i.e. on the fly.
        """
        self.check_frozen_inputs(stage)
        self.serve_frozen_inputs()
        if self.stored is not None:
            self._setup_stored(stage)
            return
        if stage == "fit" and self.uncertainty and self.fastfill_terms[1]:
            unknown = sorted(set(self.trainer.datamodule.train_class_ids) - set(self.new_classes))
            if unknown:
                raise ValueError(
                    f"FastFill's discriminative term classifies h's outputs with the new model's classifier, which "
                    f"knows the classes {self.new_classes}, but h's training split also has the classes {unknown}. "
                    "Train h on the new model's classes (--data.train_classes), use a new model trained on all of "
                    "them, or turn the term off (--model.fastfill_discriminative false).")
        if stage != "fit" or not self.cached:
            return
        dm = self.trainer.datamodule
        device = self.trainer.strategy.root_device
        models = {role: net.to(device) for role, (_, net) in self.frozen_models().items()}
        key = cache_key(
            old=self.old_meta["digest"], new=self.new_meta["digest"], side=self.side_meta.get("digest"),
            dataset=dm.name, classes=dm.train_class_ids, views=self.cache_views, seed=self.cache_seed,
            dtype=str(self.cache_dtype), image_size=getattr(dm, "image_size", None),
            # which images, and which augmentation pipeline drew the views (per item or batched in memory)
            images=[str(Path(dm.root).resolve()) if getattr(dm, "root", None) is not None else None,
                    getattr(dm, "train_dir", None), bool(getattr(dm, "in_memory_gpu", False))],
            # in memory, views are drawn per rank and batch: the same seed gives other views at another world size
            # or evaluation batch size (per item they depend on the item alone)
            batching=[self.trainer.world_size, dm.eval_batch_size] if getattr(dm, "in_memory_gpu", False) else None,
            # and what the files hold: an image added, removed or edited in a folder dataset is a new cache
            content=dm.content_key("train") if hasattr(dm, "content_key") else None,
            # and how the views were drawn: a cache made under another augmentation recipe is another cache
            augmentation=repr(dm.recipe(strong=False)) if hasattr(dm, "recipe") else None,
        )
        rank, world = self.trainer.global_rank, self.trainer.world_size
        features = build_or_load(
            self.cache_dir, key,
            lambda: embed_views(dm, models, split="train", classes=dm.train_class_ids, views=self.cache_views,
                                seed=self.cache_seed, device=device, dtype=self.cache_dtype,
                                rank=rank, world_size=world),
            rank=rank, world_size=world, barrier=self.trainer.strategy.barrier,
        )
        self._feature_loader = FeatureBatches(features, dm.batch_size, device, self.cache_seed, rank, world)
        dm.serve_training_batches(self._feature_loader)

    def _setup_stored(self, stage: str) -> None:
        """From stored embeddings: train on the datamodule's batches of stored rows (no cache, no image)."""
        dm = self.trainer.datamodule
        batches = getattr(dm, "train_batches", None) if stage == "fit" else None
        if stage == "fit" and batches is None:
            raise ValueError(f"this transformation was built to train from stored embeddings (stored=...), but the "
                             f"datamodule {type(dm).__name__} does not serve them; use fct-fit --data embeddings "
                             "(an EmbeddingsDataModule)")
        if stage != "fit":
            return
        if self.uncertainty and self.fastfill_terms[1]:
            labels = batches.labels
            if bool((labels < 0).any()):
                raise ValueError("FastFill's discriminative term needs the training items' labels, which the "
                                 "training store does not hold: create it with labels, or turn the term off "
                                 "(--model.fastfill_discriminative false)")
            unknown = sorted(set(labels.unique().tolist()) - set(self.new_classes))
            if unknown:
                raise ValueError(f"FastFill's discriminative term classifies h's outputs with the new model's "
                                 f"classifier, which knows the classes {self.new_classes}, but the training store "
                                 f"also has the labels {unknown}; turn the term off (--model.fastfill_discriminative "
                                 "false) or give the new model's checkpoint trained on them")
        self._feature_loader = batches

    def on_train_epoch_start(self) -> None:
        if hasattr(self, "_feature_loader"):
            self._feature_loader.set_epoch(self.current_epoch)
        total, per_epoch = self.schedule_length()  # the run's length in epochs, also when max_steps ends it
        self.h.set_bn_eval(self.current_epoch >= self.bn_eval_after * total / per_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            feats, labels = batch, batch["labels"]
        else:
            images, labels, _ = batch
            feats = self.frozen_embeddings(images)
        side = feats.get("side") if self.use_side_info else None
        if self.uncertainty:
            pred, log_var = self.h.forward_with_uncertainty(feats["old"], side)
            use_sim, use_disc = self.fastfill_terms
            logits = self.new_classifier(pred) if use_disc else None
            rows = self.new_class_to_row[labels] if use_disc else None
            loss = fastfill_loss(pred, feats["new"], log_var, discriminative_logits=logits, labels=rows,
                                 smoothing=self.label_smoothing, use_similarity=use_sim, use_discriminative=use_disc,
                                 similarity_reduction=self.similarity_reduction)
            self.log_loss("log_var", log_var.mean(), len(labels), step=False)
        else:
            loss = transformation_loss(self.h(feats["old"], side), feats["new"], self.loss_kind)
        self.check_loss(loss, "transformation")
        self.log_loss("loss", loss, len(labels))
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.h.parameters() if p.requires_grad]
