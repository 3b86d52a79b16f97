"""InMemoryAugmentedLoader: shapes, seeded determinism, DDP-style sharding, Lightning epoch hook."""

import pytest
import torch

from fct_lightning.data import DigitsDataModule, InMemoryAugmentedLoader, recipe_for
from fct_lightning.data.augment import augment_batch
from fct_lightning.data.kernels import crop_flip, gaussian_blur, jitter
from fct_lightning.data.recipes import Erasing, Recipe


def _images(n=23, size=8, channels=3):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 4


@pytest.mark.parametrize("views", [1, 2])
def test_shapes_and_items(views):
    x, y = _images()
    loader = InMemoryAugmentedLoader(x, y, 5, classes=[1, 3], views=views, device="cpu", image_size=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 11 items of classes 1, 3
    xb, _yb, _ib = batches[0]
    assert xb.shape == ((5, 3, 8, 8) if views == 1 else (5, 2, 3, 8, 8)) and xb.dtype == torch.float32
    assert set(torch.cat([b[1] for b in batches]).tolist()) == {1, 3}
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(11))
    assert torch.equal(torch.cat([b[1] for b in batches]), loader.labels[idx])


def test_seeded_determinism_and_epochs():
    x, y = _images()
    a = InMemoryAugmentedLoader(x, y, 8, seed=3, device="cpu", views=2)
    b = InMemoryAugmentedLoader(x, y, 8, seed=3, device="cpu", views=2)
    ea, eb = list(a), list(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[2], q[2]) for p, q in zip(ea, eb, strict=True))
    second = list(a)  # next epoch: new order and augmentation
    assert not torch.equal(second[0][2], ea[0][2]) or not torch.equal(second[0][0], ea[0][0])
    a.set_epoch(0)
    assert torch.equal(next(iter(a))[0], ea[0][0])
    assert a.sampler is a  # Lightning's per-epoch set_epoch reaches the loader


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharding_covers_every_index(world):
    x, y = _images(n=23)
    shards = [InMemoryAugmentedLoader(x, y, 4, seed=1, device="cpu", rank=r, world_size=world, train=False)
              for r in range(world)]
    per_rank = [torch.cat([b[2] for b in s]) for s in shards]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == -(-23 // world)
    assert all(len(s) == -(-len(per_rank[0]) // 4) for s in shards)
    every = torch.cat(per_rank)
    assert set(every.tolist()) == set(range(23)) and len(every) - 23 < world
    # same permutation on every rank: the shards are disjoint up to the padding duplicates
    assert len(every) - len(set(every.tolist())) == len(every) - 23


def test_eval_mode_is_normalisation_only():
    x, y = _images()
    loader = InMemoryAugmentedLoader(x, y, 50, train=False, shuffle=False, mean=(0.5,) * 3, std=(0.25,) * 3,
                                     device="cpu")
    xb, _yb, ib = next(iter(loader))
    assert ib.tolist() == list(range(23))
    from torchvision.transforms import v2

    per_item = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    assert torch.equal(xb, torch.stack([per_item(img) for img in x]))  # the per-item transform, bit for bit


def test_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    oy, ox = (torch.randint(0, 5, (2, 1, 1), generator=g) for _ in range(2))
    out = crop_flip(x, 2, oy, ox)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_digits_in_memory_datamodule():
    dm = DigitsDataModule(in_memory_gpu=True, batch_size=64, views=2, train_classes=3)
    loader = dm.train_dataloader()
    xb, yb, _ib = next(iter(loader))
    assert xb.shape == (64, 2, 1, 8, 8) and set(yb.tolist()) <= {0, 1, 2}
    assert not torch.allclose(xb[:, 0], xb[:, 1])
    assert len(loader.dataset) == len(dm.dataset("train", dm.train_class_ids))


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = _images(n=23)
    loader = InMemoryAugmentedLoader(x, y, 4, seed=7, device="cpu")
    loader.set_epoch(3)
    torch.save(torch.cat([b[2] for b in loader]), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_sharding_under_torch_distributed(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(got[0]) == len(got[1]) == 12
    assert set(torch.cat(got).tolist()) == set(range(23))
    x, y = _images(n=23)
    ref = InMemoryAugmentedLoader(x, y, 4, seed=7, device="cpu", rank=1, world_size=2)
    assert torch.equal(ref.indices(3), got[1].cpu())


@pytest.mark.parametrize("sigma", [0.3, 1.7])
def test_batched_blur_matches_torchvision(sigma):
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    out = gaussian_blur(x, torch.full((3,), sigma), torch.ones(3, dtype=torch.bool), 5)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [sigma, sigma]), atol=1e-5, rtol=0)
    assert torch.equal(gaussian_blur(x, torch.full((3,), sigma), torch.zeros(3, dtype=torch.bool), 5), x)


def test_blur_filters_the_drawn_images_only():
    """Half the images drawn: those are blurred as torchvision does, the others come back untouched."""
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    on = torch.rand(16, generator=torch.Generator().manual_seed(2)) < 0.5
    out = gaussian_blur(x, torch.full((16,), 0.8), on, 5)
    same = [bool(torch.equal(out[i], x[i])) for i in range(16)]
    assert 0 < sum(same) < 16
    for i in (i for i in range(16) if not same[i]):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [0.8, 0.8]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_folded_jitter_matches_torchvision_steps(channels):
    """The one-pass jitter equals torchvision's brightness, contrast, saturation steps wherever those do not clip."""
    from torchvision.transforms.v2 import functional as TF

    x = 0.35 + 0.3 * torch.rand(4, channels, 9, 7, generator=torch.Generator().manual_seed(0))  # no clipping
    def f(lo, hi):
        return torch.linspace(lo, hi, 4).view(4, 1, 1, 1)

    b, c, s = f(0.8, 1.2), f(1.15, 0.85), f(0.9, 1.1)
    out = jitter(x, b, c, s)
    for i in range(4):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], b[i].item()), c[i].item())
        if channels == 3:
            ref = TF.adjust_saturation(ref, s[i].item())
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=0)  # grey weights 0.299 vs torchvision's 0.2989
    assert jitter(torch.ones(1, channels, 2, 2), f(1.5, 1.5)[:1], f(1, 1)[:1]).max() == 1.0  # clamped


@pytest.mark.parametrize("strong", [False, True])
def test_imagenet_family_augmentation(strong):
    recipe = recipe_for("imagenet", strong)
    x = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment_batch(x, recipe, 32, torch.Generator().manual_seed(5))
    b = augment_batch(x, recipe, 32, torch.Generator().manual_seed(5))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    # a random resized crop of a constant image is that constant (inside the image)
    flat = torch.full((4, 3, 40, 40), 128, dtype=torch.uint8)
    c = augment_batch(flat, recipe_for("imagenet", False), 32, torch.Generator().manual_seed(5))
    torch.testing.assert_close(c, torch.full_like(c, 128 / 255))


@pytest.mark.parametrize("family", ["cifar", "imagenet"])
def test_resized_crops_do_not_darken_the_edges(family):
    """Crops reaching the image edge sample up to half a pixel beyond the last pixel centre: with zero padding the
    border row faded towards black; the crop's pixels must all come from the image."""
    flat = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment_batch(flat, recipe_for(family, True), 32, torch.Generator().manual_seed(0))
    # jitter and grayscale change an image's colour, but a constant image stays constant (blur reflects)
    spread = out.flatten(2).amax(-1) - out.flatten(2).amin(-1)
    assert float(spread.max()) < 1e-5


def test_eval_loader_for_all_ranks_is_not_sharded(monkeypatch):
    """Under DDP the in-memory eval loader shards itself (Lightning's validation); ``all_ranks=True`` (BCT's old
    classifier rows for the new classes) gives every rank the whole split, as the per-item loader does."""
    from fct_lightning.data import DigitsDataModule, memory

    monkeypatch.setattr(memory, "dist_info", lambda: (1, 2))  # rank 1 of 2
    dm = DigitsDataModule(in_memory_gpu=True)
    n = len(dm.dataset("train"))
    def count(loader):
        return sum(len(b[1]) for b in loader)

    assert count(dm.eval_dataloader("train")) == (n + 1) // 2
    assert count(dm.eval_dataloader("train", all_ranks=True)) == n
    assert count(DigitsDataModule(in_memory_gpu=False).eval_dataloader("train", all_ranks=True)) == n


def test_batched_random_erasing():
    """p=1: every image gets one zeroed rectangle of 2-12 % of its area (up to rounding); p=0: untouched."""
    def random_erasing(x, gen, p):
        return augment_batch(x, Recipe("erase", erasing=Erasing(p=p, scale=(0.02, 0.12))), 32, gen)

    x = torch.ones(200, 1, 32, 32)
    out = random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
    for img in out[:, 0]:
        rows, cols = (img == 0).any(1).nonzero().flatten(), (img == 0).any(0).nonzero().flatten()
        n = int((img == 0).sum())
        assert n == len(rows) * len(cols)  # a rectangle
        assert rows.tolist() == list(range(rows[0], rows[-1] + 1))
        assert 0.01 * 1024 <= n <= 0.14 * 1024
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(0), p=0.0), x)
    some = random_erasing(x, torch.Generator().manual_seed(1), p=0.3)
    assert 0.15 < float((some == 0).flatten(1).any(1).float().mean()) < 0.45


def test_training_loaders_leave_out_a_one_item_tail():
    """The datamodules' training loaders (in memory and per item) drop a last batch of one item, which BatchNorm
    cannot train on; evaluation loaders keep every item."""
    x, y = _images(n=9)
    train = InMemoryAugmentedLoader(x, y, 4, device="cpu", drop_single_tail=True)
    assert [len(b[1]) for b in train] == [4, 4] and len(train) == 2
    full = InMemoryAugmentedLoader(x, y, 4, device="cpu", shuffle=False, train=False)
    assert [len(b[1]) for b in full] == [4, 4, 1] and len(full) == 3
    ranks = [InMemoryAugmentedLoader(x, y, 4, device="cpu", drop_single_tail=True, rank=r, world_size=2)
             for r in range(2)]
    assert [[len(b[1]) for b in r] for r in ranks] == [[4], [4]]
    for in_memory in (True, False):  # digits: 1257 training items = 8 * 157 + 1
        dm = DigitsDataModule(batch_size=157, in_memory_gpu=in_memory)
        dm.setup("fit")
        assert [len(b[1]) for b in dm.train_dataloader()] == [157] * 8
        assert sum(len(b[1]) for b in dm.val_dataloader()) == len(dm.dataset(dm.eval_split))
