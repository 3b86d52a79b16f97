"""InMemoryAugmentedLoader on a CUDA device: items, determinism, evaluation pixels, and the recipes' distributions.

Throughput is measured by ``bench/bench_train_throughput.py`` and ``bench/bench_augment.py --device cuda``.
"""

import pytest
import torch

from fct_lightning.data import RECIPES, InMemoryAugmentedLoader
from fct_lightning.data.recipes import ResizedCrop
from fct_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from tests.data.test_recipes import N, colour, fitted_maps, geometry, only, patches, ramp, same

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cifar_like(n=50_000):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def _loader(x, y, **kw):
    return InMemoryAugmentedLoader(x, y, kw.pop("batch_size", 512), mean=CIFAR10_MEAN, std=CIFAR10_STD, **kw)


def test_cuda_items_determinism_and_eval():
    x, y = _cifar_like(5_000)
    a, b = _loader(x, y, seed=1, views=2), _loader(x, y, seed=1, views=2)
    ba, bb = list(a), list(b)
    assert ba[0][0].is_cuda and ba[0][0].shape == (512, 2, 3, 32, 32)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(ba, bb, strict=True))
    idx = torch.cat([t[2] for t in ba])
    assert sorted(idx.tolist()) == list(range(5_000))
    assert torch.equal(torch.cat([t[1] for t in ba]).cpu(), y[idx.cpu()])
    ev = _loader(x, y, train=False, shuffle=False)
    xe, _, _ie = next(iter(ev))
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(xe.cpu(), (x[:512].float() / 255 - mean) / std, atol=1e-5)


@pytest.mark.parametrize("views", [1, 2])
def test_cuda_imagenet_family_matches_cpu_shapes_and_is_seeded(views):
    """The folder datasets' batched augmentation (resized crop, jitter, grayscale, blur) on the GPU."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (600, 3, 73, 73), generator=g, dtype=torch.uint8), torch.arange(600) % 6
    kw = {"family": "imagenet", "image_size": 64, "views": views, "seed": 3, "batch_size": 128}
    a, b = list(_loader(x, y, **kw)), list(_loader(x, y, **kw))
    assert a[0][0].is_cuda and a[0][0].shape == ((128, 3, 64, 64) if views == 1 else (128, 2, 3, 64, 64))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert all(torch.isfinite(p[0]).all() for p in a)
    ev = list(_loader(x, y, family="imagenet", image_size=64, train=False, shuffle=False, device="cuda"))
    cpu = list(_loader(x, y, family="imagenet", image_size=64, train=False, shuffle=False, device="cpu"))
    torch.testing.assert_close(ev[0][0].cpu(), cpu[0][0], atol=1e-6, rtol=0)  # crop, scale, normalise only


def _on(device, recipe, probe, size):
    zeros, ones = (0.0,) * probe.shape[0], (1.0,) * probe.shape[0]
    loader = InMemoryAugmentedLoader(probe.expand(N, *probe.shape).contiguous(), torch.zeros(N), 500,
                                     family=recipe.name.split("/")[0], recipe=recipe, image_size=size, mean=zeros,
                                     std=ones, shuffle=False, seed=0, device=device)
    out = torch.cat([b[0] for b in loader])
    assert out.device.type == torch.device(device).type and out.shape == (N, *probe.shape[:1], size, size)
    assert 0 <= float(out.min()) and float(out.max()) <= 1 and torch.isfinite(out).all()
    return out.cpu()


@pytest.mark.parametrize("key", list(RECIPES), ids=[f"{f}-{'strong' if s else 'weak'}" for f, s in RECIPES])
def test_cuda_batches_draw_the_recipes_distribution(key):
    """The device's generator (Philox) must give the same parameter distributions as the CPU's (tests/data/
    test_recipes.py compares the CPU batched path with the per-item one)."""
    recipe = RECIPES[key]
    geo = only(recipe, "crop", "flip_p", "affine")
    side = 48 if isinstance(geo.crop, ResizedCrop) else 32
    a, b = (geometry(fitted_maps(_on(d, geo, ramp(side), 32)), geo) for d in ("cuda", "cpu"))
    for name in a:
        same(f"cuda vs cpu {name}", a[name], b[name])
    if recipe.jitter is not None or recipe.grayscale_p:
        col = only(recipe, "jitter", "grayscale_p")
        a, b = (colour(_on(d, col, patches(), 30)) for d in ("cuda", "cpu"))
        for name in a:
            same(f"cuda vs cpu {name}", a[name], b[name])
