"""InMemoryAugmentedLoader on a CUDA device: correctness, and throughput (printed; run with -s)."""

import time

import pytest
import torch

from fct_lightning.data import InMemoryAugmentedLoader
from fct_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD

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
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(ba, bb))
    idx = torch.cat([t[2] for t in ba])
    assert sorted(idx.tolist()) == list(range(5_000))
    assert torch.equal(torch.cat([t[1] for t in ba]).cpu(), y[idx.cpu()])
    ev = _loader(x, y, train=False, shuffle=False)
    xe, _, _ie = next(iter(ev))
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(xe.cpu(), (x[:512].float() / 255 - mean) / std, atol=1e-5)


def _rate(loader, epochs=3, step=None):
    n = 0
    for e in range(epochs + 1):
        if e == 1:  # epoch 0 is warm-up (device copy, kernels)
            torch.cuda.synchronize()
            t, n = time.perf_counter(), 0
        for xb, yb, ib in loader:
            if step is not None:
                step(xb, yb)
            n += len(yb)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


@pytest.mark.slow
def test_throughput_loader_and_resnet18():
    import torchvision

    x, y = _cifar_like()
    for views in (1, 2):
        print(f"\nloader only, views={views}: {_rate(_loader(x, y, views=views)):,.0f} img/s")
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    model = model.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(xb, yb):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fixed = next(iter(_loader(x, y)))
    synthetic = [fixed] * 98  # one epoch's worth of batches, no data pipeline
    print(f"resnet18 bf16 channels_last, fixed batch: {_rate(synthetic, 2, step):,.0f} img/s")
    print(f"resnet18 bf16 channels_last, loader:      {_rate(_loader(x, y), 2, step):,.0f} img/s")


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
