"""Training augmentation, both data paths: time per batch, per recipe, with the alternatives measured in one process.

Rows are the shipped recipes (:data:`fct_lightning.data.recipes.RECIPES`). Columns, all for one batch of ``--batch``
images, medians of ``--rounds`` alternating rounds (the machines are noisy: only ratios from one process compare):

* ``batched``: :func:`fct_lightning.data.augment.augment_batch` (the in-memory path, on ``--device``);
* ``torchvision v2 loop``: the same recipe as torchvision v2 transforms, called image by image (v2 draws one set
  of parameters per call, so a batch with per-image parameters is a loop);
* ``kornia``: the same recipe as a ``kornia.augmentation`` sequence on the batch, when kornia is importable
  (it is not a dependency: ``pip install --target DIR kornia kornia_rs --no-deps`` and ``PYTHONPATH=DIR``);
* ``per item``: the per-item transform (:func:`fct_lightning.data.transforms.build_transforms`, one image at a
  time, as in a DataLoader worker), on CPU.

With ``--ref REV`` the data package as it was at git revision ``REV`` is loaded in this process under another name,
and its batched and per-item paths are timed next to the current ones (``ref / cur``: above 1 = now faster). The
largest difference between the two batched outputs from generators seeded alike is printed too: 0 where a recipe
draws and applies exactly as before.

    OMP_NUM_THREADS=1 python bench/bench_augment.py --ref HEAD
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.transforms import v2

from fct_lightning.data import recipes, transforms
from fct_lightning.data.recipes import PadCrop, Recipe, ResizedCrop

# family, strong, stored side (or height, width), output side, channels: the shipped pipelines
CASES = [
    ("cifar", False, 32, 32, 3),
    ("cifar", True, 32, 32, 3),
    ("imagenet", False, 73, 64, 3),
    ("imagenet", True, 73, 64, 3),
    ("digits", False, 8, 8, 1),
    ("digits", True, 8, 8, 1),
    ("imagenet", True, (375, 500), 224, 3),  # a photo, as the per-item path sees it
]
ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str):
    """``fct_lightning.data`` as it was at git revision ``rev``, imported as the package ``fct_ref_data``."""
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:src/fct_lightning/data"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = Path(tempfile.mkdtemp()) / "fct_ref_data"
    pkg.mkdir()
    for name in (n for n in names if n.endswith(".py")):
        text = subprocess.run(["git", "show", f"{rev}:src/fct_lightning/data/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        # the package's own imports point at the copy; __init__ left empty (it imports every dataset)
        (pkg / name).write_text("" if name == "__init__.py" else text.replace("fct_lightning.data", "fct_ref_data"))
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("fct_ref_data")


def batched_fn(pkg_name: str) -> Callable:
    """``f(x, family, strong, size, gen)``: the batched path of a data package (recipe-based or older)."""
    memory = importlib.import_module(f"{pkg_name}.memory")
    try:
        rec = importlib.import_module(f"{pkg_name}.recipes")
        aug = importlib.import_module(f"{pkg_name}.augment")
    except ImportError:  # before the recipes: augment_batch(x, family, strong, size, gen) in memory.py
        return memory.augment_batch
    return lambda x, family, strong, size, gen: aug.augment_batch(x, rec.recipe_for(family, strong), size, gen)


def v2_ops(recipe: Recipe, size: int) -> list:
    """``recipe`` as torchvision v2 transforms on float images in [0, 1] (the v2 loop column)."""
    ops: list = []
    crop = recipe.crop
    if isinstance(crop, ResizedCrop):
        ops.append(v2.RandomResizedCrop(size, scale=crop.scale, ratio=crop.ratio, antialias=True))
    elif isinstance(crop, PadCrop):
        ops += [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=crop.pad(size))]
    if recipe.flip_p:
        ops.append(v2.RandomHorizontalFlip(recipe.flip_p))
    if (a := recipe.affine) is not None:
        ops.append(v2.RandomAffine(a.degrees, (a.translate, a.translate), a.scale, a.shear or None,
                                   interpolation=v2.InterpolationMode.BILINEAR))
    if (j := recipe.jitter) is not None:
        ops.append(v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.p))
    if recipe.grayscale_p:
        ops.append(v2.RandomGrayscale(recipe.grayscale_p))
    if (b := recipe.blur) is not None:
        ops.append(v2.RandomApply([v2.GaussianBlur(recipes.blur_kernel(size), b.sigma)], p=b.p))
    if recipe.noise_sigma:
        ops.append(v2.GaussianNoise(sigma=recipe.noise_sigma))
    if (e := recipe.erasing) is not None:
        ops.append(v2.RandomErasing(e.p, e.scale, e.ratio, e.value))
    return ops


def kornia_fn(recipe: Recipe, size: int) -> Callable | None:
    """``recipe`` as a kornia augmentation sequence on a float batch, or None without kornia."""
    try:
        import kornia.augmentation as KA
    except ImportError:
        return None
    ops: list = []
    crop = recipe.crop
    if isinstance(crop, ResizedCrop):
        ops.append(KA.RandomResizedCrop((size, size), scale=crop.scale, ratio=crop.ratio))
    elif isinstance(crop, PadCrop):
        ops.append(KA.RandomCrop((size, size), padding=crop.pad(size)))
    if recipe.flip_p:
        ops.append(KA.RandomHorizontalFlip(p=recipe.flip_p))
    if (a := recipe.affine) is not None:
        ops.append(KA.RandomAffine(a.degrees, (a.translate, a.translate), a.scale, a.shear or None, p=1.0))
    if (j := recipe.jitter) is not None:
        ops.append(KA.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue, p=j.p))
    if recipe.grayscale_p:
        ops.append(KA.RandomGrayscale(p=recipe.grayscale_p))
    if (b := recipe.blur) is not None:
        k = recipes.blur_kernel(size)
        ops.append(KA.RandomGaussianBlur((k, k), b.sigma, p=b.p))
    if recipe.noise_sigma:
        ops.append(KA.RandomGaussianNoise(std=recipe.noise_sigma, p=1.0))
    if (e := recipe.erasing) is not None:
        ops.append(KA.RandomErasing(e.scale, e.ratio, e.value, p=e.p))
    seq = KA.AugmentationSequential(*ops)
    return lambda x: seq(x.float().div(255) if x.dtype == torch.uint8 else x)


def time_ms(fn: Callable[[], object], repeats: int, dev: torch.device) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median of each is printed")
    p.add_argument("--ref", default=None, help="git revision whose data package is the reference")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    ref = load_revision(args.ref).__name__ if args.ref else None
    dev = torch.device(args.device)
    cur = batched_fn("fct_lightning.data")
    ref_batched = batched_fn(ref) if ref else None
    ref_transforms = importlib.import_module(f"{ref}.transforms") if ref else None
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}, batch {args.batch}"
          f"{f', reference {args.ref}' if ref else ''}; milliseconds per batch")
    print("| recipe | stored -> out | batched | ref batched | ref / cur | max abs diff | torchvision v2 loop "
          "| kornia | per item | ref per item | ref / cur |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        print(bench_case(args, dev, *case, cur, ref_batched, ref_transforms))
        sys.stdout.flush()


def bench_case(args: argparse.Namespace, dev: torch.device, family: str, strong: bool, stored: int | tuple[int, int],
               out: int, channels: int, cur: Callable, ref_batched: Callable | None, ref_transforms) -> str:
    """One table row: every path and alternative on one batch of ``family``'s recipe."""
    recipe = recipes.recipe_for(family, strong)
    gen = torch.Generator(device=dev)
    h, w = (stored, stored) if isinstance(stored, int) else stored
    if family == "digits":
        x = torch.rand(args.batch, channels, h, w, device=dev)
    else:
        x = torch.randint(0, 256, (args.batch, channels, h, w), dtype=torch.uint8, device=dev)
    xf = x.float().div(255) if x.dtype == torch.uint8 else x
    v2_seq = v2.Compose(v2_ops(recipe, out))
    kornia = kornia_fn(recipe, out)
    views = 2 if strong else 1
    item = transforms.build_transforms(family, True, views, out)
    item = item.transform if views > 1 else item
    calls: dict[str, Callable[[], object]] = {
        "batched": lambda: cur(x, family, strong, out, gen.manual_seed(0)),
        "v2 loop": lambda: [v2_seq(img) for img in xf],
        "per item": lambda: [item(img) for img in x.cpu()],
    }
    if kornia is not None:
        calls["kornia"] = lambda: kornia(x)
    if ref_batched is not None:
        ref_item = ref_transforms.build_transforms(family, True, views, out)
        ref_item = ref_item.transform if views > 1 else ref_item
        calls["ref batched"] = lambda: ref_batched(x, family, strong, out, gen.manual_seed(0))
        calls["ref per item"] = lambda: [ref_item(img) for img in x.cpu()]
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            batched = name in ("batched", "ref batched", "kornia")
            times[name].append(time_ms(fn, args.repeats if batched else 1, dev if batched else torch.device("cpu")))
    med = {k: median(v) for k, v in times.items()}

    def cell(k: str) -> str:
        return f"{med[k]:.2f}" if k in med else ""

    row = [f"{family}/{'strong' if strong else 'weak'}", f"{h}x{w} -> {out}", cell("batched")]
    if ref_batched is not None:
        a = cur(x, family, strong, out, torch.Generator(device=dev).manual_seed(1))
        b = ref_batched(x, family, strong, out, torch.Generator(device=dev).manual_seed(1))
        row += [cell("ref batched"), f"{med['ref batched'] / med['batched']:.2f}x", f"{(a - b).abs().max():.1e}"]
    else:
        row += ["", "", ""]
    row += [cell("v2 loop"), cell("kornia") or "not installed", cell("per item")]
    row += [cell("ref per item"), f"{med['ref per item'] / med['per item']:.2f}x"] if ref_batched else ["", ""]
    return "| " + " | ".join(row) + " |"


if __name__ == "__main__":
    main()
