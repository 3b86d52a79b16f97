"""Small training callbacks used by the trainer presets."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class StageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state follows the stage folder when that folder is moved or copied.

    Lightning keeps a checkpoint's best score only when the callback's folder is the one recorded in it; after a
    move or copy it drops the score, and the first validation of a resumed run then replaced ``best.ckpt`` whatever
    its score. Here the recorded paths are re-rooted in the current folder instead. The state is stored under
    ``ModelCheckpoint``'s own key, so checkpoints written with either class resume with the other.
    """

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.normpath(saved) != os.path.normpath(self.dirpath):
            here = self.dirpath

            def moved(path: Any) -> Any:
                same = (isinstance(path, str) and path
                        and os.path.normpath(os.path.dirname(path)) == os.path.normpath(saved))
                return os.path.join(here, os.path.basename(path)) if same else path

            state_dict = dict(state_dict, dirpath=here, **{
                k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")})
            state_dict["best_k_models"] = {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}
        super().load_state_dict(state_dict)


class StageEMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (validation, selection, checkpoints and resume unchanged) that averages
    only what trains, on the model's device.

    Lightning's averages every parameter and buffer with ``decay * avg + (1 - decay) * current``, which fails a
    stage with frozen inputs in three ways: the frozen old, side-info and new models are averaged every step
    (most of the work for a small h), that formula does not keep a constant constant (after 10 steps at decay
    0.999 a sixth of a frozen weight's entries differ in their last bits, and those drifted frozen models are
    swapped in for validation and copied back at the end), and integer buffers such as BatchNorm's
    ``num_batches_tracked`` are truncated back to their first value. It also builds the average in the ``setup``
    hook, before the strategy moves the model to the GPU, so on a GPU every step copied all weights to the host.

    Here the floating parameters that require gradients, and the floating buffers of the modules that own them
    (BatchNorm statistics of trained layers), move by ``lerp`` towards the current values; everything else (frozen
    models, integer buffers, state such as a fitted reduction) is copied, so the average holds the frozen models
    exactly as they are. The average moves to the model's device when fitting starts (unless ``device`` is given).
    """

    def __init__(self, decay: float = 0.999, device: torch.device | str | int | None = None, **kwargs: Any) -> None:
        super().__init__(device=device, use_buffers=True, decay=decay, **kwargs)
        self.decay = decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # Lightning's setup, with the average below (the stages' configure_model is idempotent)
            pl_module.configure_model()
            self._average_model = _TrainedAverage(pl_module, self._device or pl_module.device, self.decay)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self._average_model, _TrainedAverage) and self._device is None:
            self._average_model.to(pl_module.device)
            self._average_model.pairs = None


class _TrainedAverage(AveragedModel):
    """An ``AveragedModel`` whose update lerps the trained tensors and copies the others (see :class:`StageEMA`)."""

    def __init__(self, model: nn.Module, device: torch.device | int, decay: float) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay = decay
        self.pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        self.started, self.same_device = False, True

    def _pair(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(averaged, current)`` tensors to lerp, then ``(averaged, current)`` tensors to copy."""
        mine = dict(self.module.named_modules())
        lerp: tuple[list[Tensor], list[Tensor]] = ([], [])
        copy: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, module in model.named_modules():
            params = list(module.named_parameters(recurse=False))
            trained = any(p.requires_grad for _, p in params)
            buffers = [(k, b, trained) for k, b in module.named_buffers(recurse=False) if b is not None]
            for key, t, moves in [(k, p, p.requires_grad) for k, p in params] + buffers:
                average = getattr(mine[name], key).detach()
                target = lerp if moves and t.is_floating_point() else copy
                target[0].append(average)
                target[1].append(t.detach())
        return lerp[0], lerp[1], copy[0], copy[1]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.pairs is None:  # once per fit (one host sync to read the restored count, not one per step)
            self.pairs, self.started = self._pair(model), bool(self.n_averaged > 0)
            self.same_device = self.n_averaged.device == next(iter(model.parameters())).device
        lerp_a, lerp_m, copy_a, copy_m = self.pairs
        if not self.same_device:  # the current tensors come over first when the average is kept elsewhere
            lerp_m, copy_m = [m.to(a.device) for a, m in zip(lerp_a, lerp_m, strict=True)], [
                m.to(a.device) for a, m in zip(copy_a, copy_m, strict=True)]
        if not self.started:
            copy_a, copy_m = lerp_a + copy_a, lerp_m + copy_m
        elif lerp_a:
            torch._foreach_lerp_(lerp_a, lerp_m, 1.0 - self.decay)
        if copy_a:
            torch._foreach_copy_(copy_a, copy_m)
        self.n_averaged += 1
        self.started = True


class ChannelsLast(pl.Callback):
    """Keep the module's 4-D weights in ``channels_last`` memory format (faster convolutions with bf16 on GPU).

    Inputs need no conversion: a convolution with channels_last weights produces channels_last activations.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.to(memory_format=torch.channels_last)

    on_validation_start = on_fit_start


class Compile(pl.Callback):
    """``torch.compile`` the stage's trained networks in place, before the first step.

    ``nn.Module.compile`` keeps the module and its parameter names, so checkpoints are the same as without it
    and load anywhere. Compilation happens at the first forward pass (tens of seconds; more on a small CPU);
    training and evaluation mode, and each batch shape, compile separately. Fused kernels and fewer launches
    per step can pay that back on long GPU runs; measure first: on a 2-core CPU a whole ``cifar10_cpu`` stage
    was slower compiled although each step was faster (docs/benchmarks.md).

    Args:
        modules: Attribute names of the submodules to compile; names a stage lacks are skipped (``net``: the
            backbone of old, side_info, new and bct; ``h``: the transformation).
        mode: ``torch.compile`` mode: None (default), ``"max-autotune-no-cudagraphs"`` or ``"reduce-overhead"``
            (CUDA graphs).
        dynamic: ``torch.compile``'s ``dynamic``. False (default): one static graph per batch shape, so an
            epoch's smaller last batch gets its own graph instead of turning every later step dynamic.
    """

    def __init__(self, modules: list[str] | tuple[str, ...] = ("net", "h"), mode: str | None = None,
                 dynamic: bool | None = False) -> None:
        self.modules = tuple(modules)
        self.mode, self.dynamic = mode, dynamic
        self.compiled: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # inductor builds C++ (CPU) or Triton launchers (CUDA) at the first step: fail now, with the fix, rather
        # than in a long traceback from inside the first forward pass
        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), os.environ.get("CC", ""), "g++", "c++",
                                              "clang++", "gcc", "cc", "clang") if c):
            raise RuntimeError("the Compile callback needs a C/C++ compiler on PATH for torch.compile (e.g. "
                               "apt-get install g++), or drop --trainer.callbacks+=...Compile")
        for name in self.modules:
            module = getattr(pl_module, name, None)
            if isinstance(module, torch.nn.Module) and getattr(module, "_compiled_call_impl", None) is None:
                module.compile(mode=self.mode, dynamic=self.dynamic)
                self.compiled.append(name)
        if not self.compiled:
            raise ValueError(f"Compile found none of the submodules {list(self.modules)} on "
                             f"{type(pl_module).__name__}; name the ones to compile with modules=[...]")


class Throughput(pl.Callback):
    """Measures training images (items) per second and the share of time spent waiting for data.

    Logs ``perf/train_items_per_s`` and ``perf/data_wait_share`` per epoch; the first ``skip`` batches
    of every epoch are excluded (warm-up, cuDNN autotuning, worker start). Results stay in :attr:`history`.
    """

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.history: list[dict[str, float]] = []

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._items, self._wait, self._start, self._last_end, self._seen = 0, 0.0, None, time.perf_counter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._seen == self.skip + 1:
            self._sync(trainer)
            self._start, self._items, self._wait = time.perf_counter(), 0, 0.0
        elif self._start is not None:
            self._wait += now - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            images = batch["labels"] if isinstance(batch, dict) else batch[0]
            self._items += len(images)
        self._last_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None or self._items == 0:
            return
        self._sync(trainer)
        elapsed = time.perf_counter() - self._start
        row = {"items_per_s": self._items / elapsed, "data_wait_share": self._wait / elapsed, "seconds": elapsed}
        self.history.append(row)
        pl_module.log("perf/train_items_per_s", row["items_per_s"], rank_zero_only=True)
        pl_module.log("perf/data_wait_share", row["data_wait_share"], rank_zero_only=True)
