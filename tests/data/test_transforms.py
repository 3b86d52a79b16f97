"""build_transforms: output shapes, dtypes and normalisation per family."""

import pytest
import torch

from fct_lightning.data import MultiView, build_transforms


@pytest.mark.parametrize("family, image, size", [
    ("digits", torch.rand(1, 8, 8), 8),
    ("cifar", torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), 32),
    ("imagenet", torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8), 24),
])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("views", [1, 2])
def test_shapes(family, image, size, train, views):
    t = build_transforms(family, train, views, size)
    out = t(image)
    c = image.shape[0]
    assert out.shape == ((c, size, size) if views == 1 else (views, c, size, size))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert isinstance(t, MultiView) == (views > 1)


def test_eval_cifar_is_exact_normalisation():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = build_transforms("cifar", False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert torch.allclose(out, img.float() / 127.5 - 1, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="family='mnist'.*digits, cifar, imagenet"):
        build_transforms("mnist", True)
    with pytest.raises(ValueError, match="views=0"):
        build_transforms("cifar", True, 0)
