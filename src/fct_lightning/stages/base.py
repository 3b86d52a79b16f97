"""The small base every stage shares: evaluation hooks, checkpoint metadata, optimiser and schedule.

A stage declares the embedding spaces it can produce for an image batch (``eval_embeddings``) and the
evaluation cases it logs (``eval_cases``: case name -> (query space, gallery space)). Validation steps
return those embeddings with labels and item indices; the :class:`~fct_lightning.retrieval.callback.
RetrievalEvaluation` callback gathers them across ranks and computes retrieval metrics once per epoch.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor

from fct_lightning.losses import check_finite
from fct_lightning.models.backbones import EmbeddingNet
from fct_lightning.models.inputs import InputSpec
from fct_lightning.stages.checkpoints import CheckpointError, check_class_names, check_holdout

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
AVERAGING_CURRENT = "current_model_state"
"""Where Lightning's WeightAveraging callbacks (EMA, SWA) keep the training weights in a checkpoint whose
``state_dict`` holds the averaged ones."""

STAGE_CLASSES: dict[str, type[RetrievalStage]] = {}
"""Every stage's LightningModule by its ``stage`` name (filled as the classes are defined: see
:meth:`RetrievalStage.__init_subclass__`); checkpoints name their stage, and loading looks the class up here."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RetrievalStage(pl.LightningModule):
    """Base of every stage.

    Subclasses set ``stage`` and implement :meth:`eval_embeddings`, :attr:`eval_cases`,
    :meth:`query_embed`, :meth:`gallery_embed` and ``training_step``.

    Args:
        dataset: Name of the dataset the stage is trained on (stored in checkpoints, checked by later stages).
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        lr: Peak learning rate (reached after warm-up).
        weight_decay: Weight decay.
        momentum: SGD momentum (ignored by AdamW).
        warmup_epochs: Linear warm-up length in epochs (fractions allowed); the schedule is stepped per iteration.
        min_lr_ratio: Final learning rate of the cosine decay as a fraction of ``lr``.
        ema_decay: Keep an exponential moving average of the trained weights with this decay per step
            (:class:`~fct_lightning.callbacks.StageEMA`, which fct-fit adds): validation, model selection,
            ``best.ckpt`` and the final weights are the average's, ``last.ckpt`` keeps both to resume. 0 (default)
            = no average.
    """

    stage: ClassVar[str] = ""
    #: Submodules holding frozen upstream models: left out of checkpoints (their own checkpoints hold them).
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    #: Constructor arguments renamed since checkpoints were written: ``{old name: new name}`` (applied on loading).
    renamed_hparams: ClassVar[dict[str, str]] = {}
    #: On an accelerator, per-step sanity checks (finite loss, labels in range) are recorded on the device and
    #: read back every this many training steps, before every validation and at every epoch end. Reading a
    #: value back makes the host wait for the device; doing it every step would stop the host from queueing
    #: the next steps ahead. On CPU every step is checked at once (nothing to wait for).
    deferred_check_every: ClassVar[int] = 50
    #: Defer the checks on CPU too (tests use it to exercise the GPU path).
    defer_checks_on_cpu: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = vars(cls).get("stage")
        if name:
            if name in STAGE_CLASSES and STAGE_CLASSES[name].__qualname__ != cls.__qualname__:
                raise ValueError(f"two stage classes are named {name!r}: {STAGE_CLASSES[name]} and {cls}")
            STAGE_CLASSES[name] = cls

    def __init__(
        self,
        dataset: str = "",
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        ema_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1): the weight the average keeps per step (e.g. "
                             "0.999), or 0 for no average")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not known; choose one of {OPTIMIZERS}.")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0.")
        self.dataset = dataset
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.ema_decay = ema_decay

    # ----------------------------------------------------------------- evaluation interface
    @property
    def eval_cases(self) -> dict[str, tuple[str, str]]:
        """Evaluation cases: ``{case: (query space, gallery space)}``, e.g. ``{"new/old": ("new", "old")}``."""
        raise NotImplementedError

    def eval_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        """Embeddings of ``images`` in every space the cases need: ``{space: Tensor[B, D]}``."""
        raise NotImplementedError

    def query_embed(self, images: Tensor) -> Tensor:
        """Embeddings of query images for this stage's main case."""
        raise NotImplementedError

    def gallery_embed(self, images: Tensor) -> Tensor:
        """Embeddings of gallery images for this stage's main case."""
        raise NotImplementedError

    @property
    def main_case(self) -> str:
        """The case whose mAP selects the best checkpoint."""
        return next(iter(self.eval_cases))

    @property
    def monitor(self) -> str:
        """Logged key that ModelCheckpoint monitors (higher is better)."""
        return f"val/{self.main_case}/map"

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        images, labels, index = batch
        embeddings = self.eval_embeddings(images)
        self.validation_extra(embeddings, labels)
        return {"embeddings": embeddings, "labels": labels, "index": index}

    def validation_extra(self, embeddings: dict[str, Tensor], labels: Tensor) -> None:
        """Hook for stage-specific validation metrics (e.g. classification accuracy)."""

    # ----------------------------------------------------------------- per-step sanity checks
    def check_loss(self, loss: Tensor, what: str) -> None:
        """Stop on a NaN or infinite ``loss`` (at once on CPU; within ``deferred_check_every`` steps on a GPU)."""
        if not self.deferring(loss.device):
            check_finite(loss, what, self.global_step)
            return
        self._defer("loss", loss.detach(), what)  # no kernel: the value itself is checked when read back

    def deferring(self, device: torch.device) -> bool:
        return device.type != "cpu" or self.defer_checks_on_cpu

    def _defer(self, key: str, value: Tensor, what: str) -> None:
        """Keep ``value`` (a 0-d tensor, still on the device) and this step's number, to check when read back.

        ``key`` names the check: ``"loss"`` fails on a value that is not finite, any other key on a negative
        value. Keeping the tensors costs no kernel launch and no wait; :meth:`raise_deferred` stacks them and
        reads them back at once. Should nothing read them back (a hand-written loop), they are read every
        ``4 * deferred_check_every`` values.
        """
        pending = self.__dict__.setdefault("_deferred", {})
        steps, values, _ = pending.setdefault(key, ([], [], what))
        steps.append(self.global_step)
        values.append(value)
        if len(values) >= 4 * self.deferred_check_every:
            self.raise_deferred()

    def raise_deferred(self) -> None:
        """Read the deferred checks back (one device sync) and raise the first failure."""
        pending = self.__dict__.pop("_deferred", None)
        if not pending:
            return
        for key, (steps, values, what) in pending.items():
            got = torch.stack(values).detach().float().cpu()
            bad = ~torch.isfinite(got) if key == "loss" else got < 0
            if not bad.any():
                continue
            step = steps[int(bad.nonzero()[0, 0])]
            if key == "loss":
                raise FloatingPointError(
                    f"loss of {what} became NaN or infinite at step {step}; lower the learning rate, check the "
                    "input data, or enable gradient clipping with --trainer.gradient_clip_val 1.0"
                )
            raise ValueError(f"at step {step}: {what}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.deferred_check_every == 0:
            self.raise_deferred()

    def on_train_epoch_end(self) -> None:
        self.raise_deferred()
        self.log_epoch_totals()

    def on_validation_start(self) -> None:
        self.raise_deferred()

    # ----------------------------------------------------------------- checkpoints
    def fct_metadata(self) -> dict[str, Any]:
        """What later stages check when they load this checkpoint: stage, dataset and the dataset's class names
        in index order (labels are indices: a class list changed since would re-label the classes)."""
        meta = {"stage": self.stage, "dataset": self.dataset}
        names = self.dataset_class_names()
        if names is not None:
            meta["class_names"] = names
        fraction = self.datamodule_val_fraction()
        if fraction is not None:
            meta["val_fraction"] = fraction
        return meta

    def datamodule_val_fraction(self) -> float | None:
        """The attached image datamodule's ``val_fraction`` (None without one, or for stored embeddings)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        fraction = getattr(dm, "val_fraction", None)
        return None if fraction is None else float(fraction)

    def dataset_class_names(self) -> list[str] | None:
        """The attached datamodule's class names in index order (None without a trainer or datamodule)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "class_names", None)
        return None if names is None else [str(n) for n in names]

    def check_frozen_inputs(self, stage: str | None = "fit") -> None:
        """Each frozen upstream model must have been trained on this run's class list (see
        :func:`~fct_lightning.stages.checkpoints.check_class_names`) and, when this run trains (``stage="fit"``),
        with its held-out validation share (:func:`~fct_lightning.stages.checkpoints.check_holdout`); validating
        a trained model on another split is fine."""
        current = self.dataset_class_names()
        fraction = self.datamodule_val_fraction() if stage in (None, "fit") else None
        for role, meta in self.frozen_inputs().items():
            if meta:
                check_class_names(meta, meta.get("path", role), role, current)
                if meta.get("dataset") == self.dataset:
                    check_holdout(meta, meta.get("path", role), role, fraction)

    def serve_frozen_inputs(self) -> None:
        """The frozen upstream image models read this run's batches, each converted to the input it was trained on
        (:mod:`fct_lightning.models.inputs`; nothing to do when they agree, as in a chain of one input)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        serve_input(self, dm, [getattr(self, name, None) for name in self.frozen_prefixes])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fct"] = self.fct_metadata()
        # the frozen upstream models are not saved with the stage, neither in its weights nor in the training
        # weights that Lightning's WeightAveraging (EMA) keeps beside the averaged ones it puts in state_dict
        for state in (checkpoint.get("state_dict", {}), checkpoint.get(AVERAGING_CURRENT, {})):
            for key in [k for k in state if k.split(".")[0] in self.frozen_prefixes]:
                del state[key]

    def frozen_inputs(self) -> dict[str, dict[str, Any]]:
        """By role, the metadata (``path``, ``digest``) of the upstream checkpoints this module loaded."""
        return {}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume with upstream checkpoints other than the ones the run started with (their content
        digests are in the checkpoint's metadata), then put the frozen upstream weights this module already holds
        back into the state to load."""
        saved = checkpoint.get("fct", {})
        for role, mine in self.frozen_inputs().items():
            want = saved.get(f"{role}_digest")
            if want and mine and mine.get("digest") and want != mine["digest"]:
                raise CheckpointError(
                    f"the {role} checkpoint {mine['path']} changed since this {self.stage} run was started (content "
                    f"{mine['digest']} != {want}): this checkpoint belongs with another {role} model. To resume, "
                    f"start a new run instead (--overwrite); to evaluate, re-train the {self.stage} stage or restore "
                    f"the {role} checkpoint it was trained with."
                )
        own = self.state_dict()
        frozen = {k: v for k, v in own.items() if k.split(".")[0] in self.frozen_prefixes}
        checkpoint["state_dict"].update(frozen)
        if AVERAGING_CURRENT in checkpoint:  # resuming under WeightAveraging: it loads these weights strictly
            checkpoint[AVERAGING_CURRENT].update(frozen)

    def train(self, mode: bool = True) -> RetrievalStage:
        """Lightning calls ``train()`` every epoch; frozen upstream models stay in eval mode."""
        super().train(mode)
        for name in self.frozen_prefixes:
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                module.eval()
        return self

    # ----------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: one, of :meth:`trainable_parameters`, at ``lr`` (stages with a
        backbone learning-rate scale add a second)."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups()
        params = [p for group in groups for p in group["params"]]
        # fused CUDA kernels: one launch per step instead of a few per parameter group (same update rule).
        # Lightning refuses gradient clipping with fused optimisers, so clipped runs keep the foreach kernels.
        clipping = bool(self._trainer is not None and self.trainer.gradient_clip_val)
        fused = {"fused": True} if params and all(p.is_cuda for p in params) and not clipping else {}
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                nesterov=self.momentum > 0, **fused,
            )
        else:
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, **fused)
        total, per_epoch = self.schedule_length()
        warmup = min(total, round(self.warmup_epochs * per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def schedule_length(self) -> tuple[int, int]:
        """``(optimizer steps of the whole run, optimizer steps per epoch)``, from the trainer's limits.

        The run may end at ``max_steps`` before ``max_epochs`` (or have ``max_epochs = -1``): warm-up and the
        other epoch-based settings are then measured in epochs of the training loader, not in ``total / max_epochs``.
        """
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the warm-up + cosine learning-rate schedule needs the run's length, but max_epochs=-1 and "
                "max_steps=-1 make it endless: set --trainer.max_epochs N or --trainer.max_steps N")
        if trainer.train_dataloader is None:  # max_epochs=-1: Lightning did not load it for the estimate
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches < 1:
            return int(total), max(int(total), 1)
        return int(total), math.ceil(batches / trainer.accumulate_grad_batches)

    # ----------------------------------------------------------------- training logs
    def log_loss(self, name: str, value: Tensor, batch_size: int, step: bool = True) -> None:
        """Log a training value as ``train/<name>_step`` (on Lightning's logging steps) and ``train/<name>_epoch``.

        The epoch value is the batch-size weighted mean over the epoch (averaged over ranks under DDP), summed on
        the device here. ``self.log`` is called only on the steps whose values Lightning writes (every
        ``log_every_n_steps``) and once per epoch: each call costs Lightning about a millisecond of host time,
        which a GPU step of a small network cannot hide.
        """
        self.add_to_epoch_total(f"train/{name}_epoch", value.detach(), batch_size, weight=batch_size)
        if step and self._logs_this_step():
            self.log(f"train/{name}_step", value, on_step=True, on_epoch=False, prog_bar=name == "loss",
                     batch_size=batch_size)

    def add_to_epoch_total(self, key: str, value: Tensor, count: int, weight: float = 1.0) -> None:
        """Add ``weight * value`` to the epoch sum logged as ``key`` (divided by the summed ``count``s).

        One in-place kernel per call after the epoch's first; nothing is read back until the epoch ends.
        """
        totals = self.__dict__.setdefault("_epoch_totals", {})
        if key in totals:
            totals[key][0].add_(value, alpha=weight)
            totals[key][1] += count
        else:
            totals[key] = [value.float() * weight, count]

    def _logs_this_step(self) -> bool:
        if self._trainer is None:  # a training_step called by hand: nowhere to log to
            return False
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def log_epoch_totals(self) -> None:
        """Log the epoch means gathered by :meth:`add_to_epoch_total` (and :meth:`log_loss`); start new ones."""
        totals = self.__dict__.pop("_epoch_totals", {})
        for key, (total, count) in totals.items():
            self.log(key, total / count, on_step=False, on_epoch=True, sync_dist=True)


class ImageModelStage(RetrievalStage):
    """A stage whose model is one image network, ``self.net`` (an
    :class:`~fct_lightning.models.backbones.EmbeddingNet`): the old, new, BCT and side-info models.

    Subclasses build ``self.net`` with ``load_weights=False`` and then call :meth:`configure_backbone`. The
    backbone's pretrained weights (``weights`` / ``pretrained``) are loaded in :meth:`configure_model`, when
    fitting starts (before a resumed checkpoint is restored over them), not at construction: rebuilding a trained
    model from its checkpoint (a later stage's frozen input, fct-eval) then reads no weights file and downloads
    nothing.
    """

    net: torch.nn.Module
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0

    def configure_backbone(self, freeze_backbone: bool = False, backbone_lr_scale: float = 1.0) -> None:
        """Freeze the trunk or give it a lower learning rate.

        Args:
            freeze_backbone: The trunk (everything below the embedding head) gets no gradients and stays in
                eval mode, BatchNorm statistics included; only the head (and the stage's own layers) train.
            backbone_lr_scale: The trunk's learning rate is ``lr * backbone_lr_scale`` (a second parameter
                group, following the same warm-up and cosine schedule). 1: one group, as without it.
        """
        if not backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale={backbone_lr_scale} must be positive; to stop training the "
                             "backbone, set freeze_backbone true.")
        self.freeze_backbone, self.backbone_lr_scale = bool(freeze_backbone), float(backbone_lr_scale)
        if self.freeze_backbone:
            self.net.trunk.requires_grad_(False)
            self.net.trunk.eval()

    @property
    def embedding_dim(self) -> int:
        return self.net.embedding_dim

    @property
    def data_config(self) -> dict[str, Any] | None:
        """Input size and normalisation the backbone was designed for (timm's data config, torchvision's weights
        transforms: ``input_size`` ``(C, H, W)``, ``mean``, ``std``, ``interpolation``, ``crop_pct``), or None
        for the own backbones, whose input is whatever the datamodule serves."""
        return self.net.data_config

    @property
    def preferred_input(self) -> dict[str, Any] | None:
        """The input the datamodule should serve (it follows it unless set): the backbone's :attr:`data_config`
        when pretrained weights are loaded into it, else None (a network trained from scratch reads the dataset's
        own size and normalisation)."""
        return self.net.data_config if self.net.weights_source is not None else None

    def fct_metadata(self) -> dict[str, Any]:
        """The base's, and the input the datamodule served (``input``: see :mod:`fct_lightning.models.inputs`)."""
        meta = super().fct_metadata()
        spec = InputSpec.of(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        if spec is not None:
            meta["input"] = spec.as_meta()
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base's checks; then the network knows the input it was trained on."""
        super().on_load_checkpoint(checkpoint)
        self.net.input_spec = InputSpec.from_meta(checkpoint.get("fct", {}).get("input"))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def configure_model(self) -> None:
        """Load the backbone's pretrained weights once, when fitting (see the class docstring)."""
        if self._trainer is None or self.trainer.state.fn != "fit" or self.__dict__.get("_backbone_loaded"):
            return
        self.net.load_backbone_weights()
        self._backbone_loaded = True

    def train(self, mode: bool = True) -> ImageModelStage:
        """A frozen backbone stays in eval mode (its BatchNorm statistics do not move)."""
        super().train(mode)
        if self.freeze_backbone:
            self.net.trunk.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """With ``backbone_lr_scale != 1``: the trunk's trainable parameters at ``lr * backbone_lr_scale``, the
        others at ``lr``; otherwise the base's single group."""
        params = self.trainable_parameters()
        if self.backbone_lr_scale == 1.0:
            return [{"params": params}]
        trunk = {id(p) for p in self.net.trunk.parameters()}
        rest = [p for p in params if id(p) not in trunk]
        backbone = [p for p in params if id(p) in trunk]
        groups = [{"params": rest, "name": "head"}]
        if backbone:
            groups.append({"params": backbone, "lr": self.lr * self.backbone_lr_scale, "name": "backbone"})
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A backbone given as an ``nn.Module`` instance from Python is recorded by its class path, so that the
        checkpoint stays weights-only loadable; it is then rebuilt with the class's default arguments (give a
        ``{"class_path", "init_args"}`` dict, as the CLI does, to record them)."""
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint.get("hyper_parameters")
        module = hparams.get("backbone") if isinstance(hparams, dict) else None
        if isinstance(module, torch.nn.Module):
            path = f"{type(module).__module__}.{type(module).__qualname__}"
            log.warning("%s: the backbone instance is saved as its class path %s without its arguments; pass "
                        "backbone={'class_path': ..., 'init_args': {...}} to keep them", self.stage, path)
            hparams["backbone"] = {"class_path": path, "init_args": {}}


def serve_input(owner: torch.nn.Module, datamodule: Any, modules: list[Any] | None = None) -> None:
    """Every image network in ``modules`` (default: all of ``owner``'s) reads ``datamodule``'s batches from now on,
    converted to its own recorded input (:meth:`~fct_lightning.models.backbones.EmbeddingNet.serve`)."""
    served = InputSpec.of(datamodule)
    for module in (modules if modules is not None else [owner]):
        for net in module.modules() if isinstance(module, torch.nn.Module) else ():
            if isinstance(net, EmbeddingNet):
                net.serve(served)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` in eval mode and stop its gradients (frozen inputs of later stages)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
