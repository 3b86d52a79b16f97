"""Small training callbacks used by the trainer presets."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint


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
