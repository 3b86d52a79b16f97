"""Datamodules yielding ``(image, label, index)``; one per dataset, all on :class:`RetrievalDataModule`."""

from __future__ import annotations

from fct_lightning.data.base import (
    RetrievalDataModule,
    RetrievalDataset,
    TensorImages,
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
from fct_lightning.data.recipes import RECIPES, Recipe, recipe_for
from fct_lightning.data.sampling import mix_seed
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


__all__ = [
    "DATAMODULES",
    "RECIPES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "InMemoryAugmentedLoader",
    "MultiView",
    "Places365DataModule",
    "Recipe",
    "RetrievalDataModule",
    "RetrievalDataset",
    "TensorImages",
    "VGGFace2DataModule",
    "build_transforms",
    "mix_seed",
    "recipe_for",
    "resolve_root",
]
