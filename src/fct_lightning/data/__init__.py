"""Datamodules yielding ``(image, label, index)``; one per dataset, all on :class:`RetrievalDataModule`."""

from __future__ import annotations

from fct_lightning.data.base import (
    RetrievalDataModule,
    RetrievalDataset,
    TensorImages,
    mix_seed,
    resolve_root,
)
from fct_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from fct_lightning.data.digits import DigitsDataModule
from fct_lightning.data.folder import (
    FolderDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    Places365DataModule,
    VGGFace2DataModule,
)
from fct_lightning.data.memory import InMemoryAugmentedLoader
from fct_lightning.data.transforms import MultiView, build_transforms

DATAMODULES: dict[str, type[RetrievalDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "imagenet": ImageNetDataModule,
    "places365": Places365DataModule,
    "vggface2": VGGFace2DataModule,
    "folder": ImageFolderDataModule,
}


def get_datamodule_class(name: str) -> type[RetrievalDataModule]:
    """The datamodule class registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the allowed names).
    """
    try:
        return DATAMODULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dataset={name!r} is unknown; allowed: {', '.join(DATAMODULES)}") from None


__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "InMemoryAugmentedLoader",
    "MultiView",
    "Places365DataModule",
    "RetrievalDataModule",
    "RetrievalDataset",
    "TensorImages",
    "VGGFace2DataModule",
    "build_transforms",
    "get_datamodule_class",
    "mix_seed",
    "resolve_root",
]
