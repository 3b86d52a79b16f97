"""The closed-form transformation stage: h = least squares or orthogonal Procrustes, fitted once, no optimiser.

The same training pairs as the FCT MLP h (:class:`~fct_lightning.stages.transformation.TransformationModel`, whose
frozen-model loading, feature cache, embeddings and checkpoint metadata this stage inherits): with ``cached=True``
(default) the transformation's feature cache (``cache_views`` seeded augmentations of every training image, shared
with it when the settings agree) is summed into float64 statistics on the device at the start of training and h is
solved from them; with ``cached=False`` each training batch of freshly augmented images (or, trained from stored
embeddings, each batch of stored rows) adds to the statistics (summed over ranks) and h is re-solved before every
validation, so more image epochs mean more augmentations.
Validation, ``best.ckpt`` and ``fct-transform`` work as for the MLP h; the cases are named after the family
(``linear+side/old``, ``linear/old``, ``procrustes/old``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fct_lightning.data.features import FeatureBatches
from fct_lightning.models.closed_form import CLOSED_FORM_MAPS, Moments
from fct_lightning.stages.transformation import TransformationModel

FAMILIES = tuple(CLOSED_FORM_MAPS)
#: What the MLP h's options are set to (the inherited constructor builds a throwaway h, replaced at once).
_NO_MLP = {"mixer_width": 1, "mixer_depth": 1, "branch_width_factor": 1, "uncertainty": False}
_ROWS = 65536  # rows per float64 GEMM when summing the cache


class ClosedFormModel(TransformationModel):
    """A closed-form h on frozen old, side-info and new models (stage ``closed_form``).

    Args:
        old_checkpoint: The old model's checkpoint.
        new_checkpoint: The new model's checkpoint.
        side_info_checkpoint: The side-info model's checkpoint (with ``use_side_info``).
        family: ``linear`` (least-squares affine map, any dimensions) or ``procrustes`` ((semi-)orthogonal: a
            rotation, or with unequal dimensions an isometry or an orthogonal projection; no side-info).
        use_side_info: Map ``[old, side]`` (True) or ``old`` alone.
        ridge: ``linear``: weight of ``||W||^2`` (0 = minimum-norm least squares).
        center: ``procrustes``: centre both sides first.
        scale: ``procrustes``: also fit one isotropic scale.
        cached: Fit from the feature cache (default) instead of from training batches of images.
        cache_views: Augmented views per training image in the cache (the transformation's value shares its cache).
        cache_dir: Where caches live (default ``artifacts/<dataset>/cache``).
        cache_dtype: Storage dtype of cached features.
        cache_seed: Seed of the cached augmentations.
        stored: Fit from stored embeddings instead of images (see the transformation stage; linked by the CLI from
            ``--data embeddings``).
        dataset: The dataset name (linked by the CLI; checked against the checkpoints).

    No optimiser settings: the constructor takes no ``**kwargs``, so the MLP h's and the optimiser's options of
    ``--stage transformation`` are no options here.
    """

    stage = "closed_form"

    def __init__(
        self,
        old_checkpoint: str | None = None,
        new_checkpoint: str | None = None,
        side_info_checkpoint: str | None = None,
        family: str = "linear",
        use_side_info: bool = True,
        ridge: float = 0.0,
        center: bool = True,
        scale: bool = False,
        cached: bool = True,
        cache_views: int = 10,
        cache_dir: str | None = None,
        cache_dtype: str = "float16",
        cache_seed: int = 0,
        stored: dict[str, dict[str, Any]] | None = None,
        dataset: str = "",
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is not known; choose one of {FAMILIES}")
        if family == "procrustes" and use_side_info:
            raise ValueError("family='procrustes' maps the old space alone (use_side_info=False); the 'linear' "
                             "family takes side-info")
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge!r} must be >= 0")
        super().__init__(old_checkpoint, new_checkpoint, side_info_checkpoint, use_side_info=use_side_info,
                         cached=cached, cache_views=cache_views, cache_dir=cache_dir, cache_dtype=cache_dtype,
                         cache_seed=cache_seed, stored=stored, dataset=dataset, **_NO_MLP)
        self.save_hyperparameters()  # this class's arguments only (not the MLP h's the parent recorded)
        self.automatic_optimization = False
        self.family, self.ridge, self.center, self.scale = family, ridge, center, scale
        side_dim = self.h.side_dim
        self.h = CLOSED_FORM_MAPS[family](self.h.old_dim, self.h.new_dim, side_dim)
        # the statistics h is solved from, saved with the checkpoint (a resumed image-fed run keeps its epochs)
        self.register_buffer("moments_gram", torch.zeros(self.h.in_dim + 1, self.h.in_dim + 1, dtype=torch.float64))
        self.register_buffer("moments_cross", torch.zeros(self.h.in_dim + 1, self.h.new_dim, dtype=torch.float64))
        self._pending: Moments | None = None
        self._from_cache = False

    @property
    def gallery_space(self) -> str:
        return self.family + ("+side" if self.use_side_info else "")

    def fct_metadata(self) -> dict[str, Any]:
        meta = super().fct_metadata()
        meta.update(family=self.family, ridge=self.ridge, center=self.center, scale=self.scale,
                    pairs=int(round(float(self.moments_gram[-1, -1]))))
        return meta

    # ----------------------------------------------------------------- fitting
    def _inputs(self, feats: dict[str, Tensor]) -> Tensor:
        return torch.cat([feats["old"], feats["side"]], dim=1) if self.use_side_info else feats["old"]

    def _moments(self) -> Moments:
        m = Moments(self.h.in_dim, self.h.new_dim, self.moments_gram.device)
        m.gram, m.cross = self.moments_gram, self.moments_cross
        return m

    def solve(self) -> None:
        """Set h from the statistics gathered so far."""
        m = self._moments()
        if self.family == "procrustes":
            self.h.fit(m, center=self.center, scale=self.scale)
        else:
            self.h.fit(m, ridge=self.ridge)

    def setup(self, stage: str) -> None:
        """The parent's set-up (cached: build or load the feature cache); then one no-op batch per epoch instead of
        the cache's mini-batches: the fit reads the whole cache at once."""
        super().setup(stage)
        self._from_cache = stage == "fit" and isinstance(getattr(self, "_feature_loader", None), FeatureBatches)
        if self._from_cache:
            self.trainer.datamodule.serve_training_batches([{"fitted_from_cache": torch.ones(1)}])

    @torch.no_grad()
    def on_train_start(self) -> None:
        if not self._from_cache:
            return
        data = self._feature_loader.data  # {space: [views, n, d]} on the device, every item on every rank
        m = self._moments()
        m.gram.zero_()
        m.cross.zero_()
        for view in range(data["old"].shape[0]):
            for start in range(0, data["old"].shape[1], _ROWS):
                feats = {s: t[view, start:start + _ROWS] for s, t in data.items()}
                m.add(self._inputs(feats), feats["new"])
        self.solve()

    def on_train_epoch_start(self) -> None:
        self._pending = None if self._from_cache else Moments(self.h.in_dim, self.h.new_dim, self.moments_gram.device)

    @torch.no_grad()
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self._from_cache:  # from the cache, h was fitted in on_train_start
            feats = batch if isinstance(batch, dict) else self.frozen_embeddings(batch[0])  # stored rows, or images
            self._pending.add(self._inputs(feats), feats["new"])
        self.optimizers().step()  # changes nothing (no gradients); counts the step, which checkpointing goes by

    def _absorb(self) -> None:
        """Sum this epoch's statistics over ranks into the saved ones and re-solve h (every rank calls it)."""
        if self._pending is None:
            return
        strategy = self.trainer.strategy
        gram = strategy.reduce(self._pending.gram, reduce_op="sum")
        cross = strategy.reduce(self._pending.cross, reduce_op="sum")
        self._pending = Moments(self.h.in_dim, self.h.new_dim, self.moments_gram.device)
        if float(gram[-1, -1]) > 0:
            self.moments_gram += gram
            self.moments_cross += cross
            self.solve()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._absorb()

    def on_train_epoch_end(self) -> None:
        self._absorb()
        super().on_train_epoch_end()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A learning rate of 0 and no gradient: h is solved, not trained. Its steps (one per training batch) count
        the trainer's ``global_step``, without which Lightning's checkpointing would save no ``best.ckpt``."""
        return torch.optim.SGD(self.h.parameters(), lr=0.0)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []
