"""One augmentation definition, two data paths: the per-item transform and the batched in-memory loader must draw
from the same distributions.

The parameters are read back from each path's *outputs* on probe images (a coordinate ramp for the geometry, grey
and coloured patches for the colour jitter, a step edge for the blur, flat images for noise and erasing), each
step of a shipped recipe on its own, and the two samples are compared with a two-sample Kolmogorov-Smirnov
statistic and against the recipe's own numbers. A change to one path's definition (another crop scale, a jitter
strength, a flip or grey rate, a dropped hue) fails here; a change to the recipe moves both paths and passes.
"""

import colorsys
import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from fct_lightning.data import InMemoryAugmentedLoader, build_transforms, recipe_for
from fct_lightning.data.augment import resized_crop_boxes
from fct_lightning.data.kernels import adjust_hue
from fct_lightning.data.recipes import RECIPES, PadCrop, Recipe, ResizedCrop

N = 2000  # draws per path
KS_MAX = 0.075  # two-sample KS statistic above which two samples of N differ (p about 5e-5)
NOTHING = {"crop": None, "flip_p": 0.0, "affine": None, "jitter": None, "grayscale_p": 0.0, "blur": None,
           "noise_sigma": 0.0, "erasing": None}
NAMES = [f"{family}-{'strong' if strong else 'weak'}" for family, strong in RECIPES]


def recipes_with(test) -> dict:
    """``parametrize`` arguments over the shipped recipes for which ``test(recipe)`` holds."""
    keys = [k for k, r in RECIPES.items() if test(r)]
    return {"argvalues": keys, "ids": [NAMES[list(RECIPES).index(k)] for k in keys]}


def only(recipe: Recipe, *steps: str) -> Recipe:
    """``recipe`` with every step but ``steps`` removed."""
    return dataclasses.replace(recipe, **{k: v for k, v in NOTHING.items() if k not in steps})


def both_paths(recipe: Recipe, probe: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` augmentations of ``probe [C, H, W]`` by the per-item transform and by the in-memory loader (mean 0,
    std 1: outputs in [0, 1])."""
    family = recipe.name.split("/")[0]
    zeros, ones = (0.0,) * probe.shape[0], (1.0,) * probe.shape[0]
    item = build_transforms(family, True, 1, size, zeros, ones, recipe=recipe)
    torch.manual_seed(0)
    per_item = torch.stack([item(probe) for _ in range(N)])
    loader = InMemoryAugmentedLoader(probe.expand(N, *probe.shape).contiguous(), torch.zeros(N), 500, family=family,
                                     recipe=recipe, image_size=size, mean=zeros, std=ones, shuffle=False, seed=0,
                                     device="cpu")
    batched = torch.cat([b[0] for b in loader])
    return per_item, batched


def same(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    d = ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), method="asymp").statistic
    assert d < KS_MAX, f"{name}: the two paths draw different distributions (KS statistic {d:.3f})"


def rate(name: str, flags: torch.Tensor, p: float) -> None:
    got = float(flags.float().mean())
    assert abs(got - p) < 4 * (p * (1 - p) / len(flags)) ** 0.5 + 1e-9, f"{name}: rate {got:.3f}, recipe {p}"


# ----- geometry: crop, flip, affine -----------------------------------------------------------------------------
def ramp(side: int) -> torch.Tensor:
    """``[3, side, side]``: channel 0 = x, channel 1 = y (pixel centre / side), channel 2 = 0.5."""
    r = (torch.arange(side) + 0.5) / side
    return torch.stack([r.expand(side, side), r.view(-1, 1).expand(side, side), torch.full((side, side), 0.5)])


def fitted_maps(out: torch.Tensor) -> torch.Tensor:
    """Per image, the affine map ``[n, 2, 3]`` from output to input normalised coordinates that the ramp's values
    reveal: a least-squares fit over the pixels sampled from inside the image, away from the output's border."""
    n, _, s, _ = out.shape
    c = (2 * torch.arange(s, dtype=torch.float64) + 1) / s - 1
    grid = torch.stack([c.expand(s, s), c.view(-1, 1).expand(s, s), torch.ones(s, s, dtype=torch.float64)], -1)
    a = grid.view(1, s * s, 3).expand(n, -1, -1)
    frame = torch.zeros(s, s, dtype=torch.bool)
    frame[2:-2, 2:-2] = True
    w = (((out[:, 2] - 0.5).abs() < 1e-4) & frame).view(n, s * s, 1).double()
    target = (2 * out[:, :2].double() - 1).flatten(2).transpose(1, 2)  # [n, s * s, 2]
    sol = torch.linalg.solve((a * w).transpose(1, 2) @ a, (a * w).transpose(1, 2) @ target)  # [n, 3, 2]
    return sol.transpose(1, 2)


def geometry(m: torch.Tensor, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The parameters a recipe's geometric steps leave in the fitted maps ``m [n, 2, 3]``."""
    out = {"tx": m[:, 0, 2], "ty": m[:, 1, 2]}
    if recipe.affine is not None:
        angle = torch.atan2(m[:, 1, 0], m[:, 0, 0])
        out |= {"angle": angle, "scale": 1 / torch.hypot(m[:, 0, 0], m[:, 1, 0]),
                "shear": torch.atan2(-m[:, 0, 1], m[:, 1, 1]) - angle}
    else:
        out |= {"flip": m[:, 0, 0] < 0, "area": (m[:, 0, 0] * m[:, 1, 1]).abs(),
                "log_ratio": (m[:, 0, 0] / m[:, 1, 1]).abs().log()}
    return out


@pytest.mark.parametrize("key", list(RECIPES), ids=NAMES)
def test_paths_draw_the_same_geometry(key):
    recipe = only(RECIPES[key], "crop", "flip_p", "affine")
    size = 32
    side = 48 if isinstance(recipe.crop, ResizedCrop) else size  # resized crops: down- and upscaled
    per_item, batched = both_paths(recipe, ramp(side), size)
    a, b = geometry(fitted_maps(per_item), recipe), geometry(fitted_maps(batched), recipe)
    for name in a:
        same(name, a[name], b[name])
    if "flip" in a:
        rate("flip", a["flip"], recipe.flip_p)
        rate("flip", b["flip"], recipe.flip_p)
    if isinstance(recipe.crop, ResizedCrop):  # torchvision's RandomResizedCrop draws these boxes
        from torchvision.transforms import RandomResizedCrop

        torch.manual_seed(1)
        boxes = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, side, side), list(recipe.crop.scale),
                                                           list(recipe.crop.ratio)) for _ in range(N)]).double()
        same("area (torchvision)", a["area"], boxes[:, 2] * boxes[:, 3] / side**2)
        same("log_ratio (torchvision)", a["log_ratio"], (boxes[:, 3] / boxes[:, 2]).log())
    if isinstance(recipe.crop, PadCrop) and recipe.affine is None:
        pad = recipe.crop.pad(size)
        shift = (a["tx"] * size / 2).abs().round()  # pixels (a flip mirrors the sign)
        assert int(shift.max()) == pad and set(shift.tolist()) <= set(range(pad + 1))
    if recipe.affine is not None:
        deg = torch.rad2deg(a["angle"])
        assert recipe.affine.degrees - 1 < float(deg.abs().max()) < recipe.affine.degrees + 0.5
        lo, hi = recipe.affine.scale
        assert lo - 0.01 < float(a["scale"].min()) and float(a["scale"].max()) < hi + 0.01


def test_crop_boxes_follow_torchvisions_rule():
    """The shared box sampler draws torchvision's RandomResizedCrop boxes, also where the fallback applies."""
    from torchvision.transforms import RandomResizedCrop

    for height, width, scale in ((40, 50, (0.08, 1.0)), (10, 100, (0.2, 1.0)), (32, 32, (0.2, 1.0))):
        crop = ResizedCrop(scale)
        ours = resized_crop_boxes(N, height, width, crop, torch.Generator().manual_seed(0), torch.device("cpu"))
        torch.manual_seed(0)
        img = torch.zeros(1, height, width)
        theirs = torch.tensor([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(N)],
                              dtype=torch.float32)
        assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
        for i, name in enumerate(("top", "left", "height", "width")):
            same(f"{height}x{width} box {name}", ours[:, i], theirs[:, i])


# ----- colour: jitter, grayscale ----------------------------------------------------------------------------------
GREY_A, GREY_B, COLOUR = 0.35, 0.55, (0.55, 0.45, 0.35)


def patches() -> torch.Tensor:
    """``[3, 30, 30]``: a grey stripe ``GREY_A``, a grey stripe ``GREY_B`` and a ``COLOUR`` stripe."""
    img = torch.empty(3, 30, 30)
    img[:, :, :10], img[:, :, 10:20] = GREY_A, GREY_B
    img[:, :, 20:] = torch.tensor(COLOUR).view(3, 1, 1)
    return img


def colour(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brightness, contrast, saturation factors, hue shift and grey flag read back from augmented patches."""
    assert 0.02 < float(out.min()) and float(out.max()) < 0.98  # nothing clipped: the read-back is exact
    a, b, c = out[:, 0, 15, 5].double(), out[:, 0, 15, 15].double(), out[:, :, 15, 25].double()
    luma = 0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2]
    mean = (GREY_A + GREY_B + luma) / 3
    p = (a - b) / (GREY_A - GREY_B)  # brightness * contrast
    brightness = p + (a + b - p * (GREY_A + GREY_B)) / (2 * mean)
    grey = (c.amax(1) - c.amin(1)) < 1e-4
    sat = (c.amax(1) - c.amin(1)) / (p * (max(COLOUR) - min(COLOUR)))
    h0 = colorsys.rgb_to_hsv(*COLOUR)[0]
    hue = torch.tensor([(colorsys.rgb_to_hsv(*rgb.tolist())[0] - h0 + 0.5) % 1.0 - 0.5 for rgb in c])
    return {"brightness": brightness, "contrast": p / brightness, "jitter_on": (brightness - 1).abs() > 1e-4,
            "grey": grey, "saturation": sat[~grey], "hue": hue[~grey]}


@pytest.mark.parametrize("key", **recipes_with(lambda r: r.jitter is not None or r.grayscale_p > 0))
def test_paths_draw_the_same_colour_jitter(key):
    recipe = only(RECIPES[key], "jitter", "grayscale_p")
    per_item, batched = both_paths(recipe, patches(), 30)
    a, b = colour(per_item), colour(batched)
    for name in a:
        same(name, a[name], b[name])
    for got in (a, b):
        rate("grey", got["grey"], recipe.grayscale_p)
        rate("jitter", got["jitter_on"], recipe.jitter.p)
    j, on = recipe.jitter, a["jitter_on"]
    for name, strength in (("brightness", j.brightness), ("contrast", j.contrast)):
        f = a[name][on]
        assert float((f - 1).abs().max()) < strength + 1e-3 and float((f - 1).abs().max()) > 0.95 * strength
    sat_on = (a["saturation"] - 1).abs() > 1e-4
    if j.saturation > 0:
        assert float((a["saturation"][sat_on] - 1).abs().max()) > 0.95 * j.saturation
    else:
        assert not sat_on.any()
    assert float(a["hue"].abs().max()) <= j.hue + 1e-4 and (j.hue == 0 or float(a["hue"].abs().max()) > 0.9 * j.hue)


# ----- blur, noise, erasing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", **recipes_with(lambda r: r.blur or r.noise_sigma or r.erasing))
def test_paths_draw_the_same_blur_noise_and_erasing(key):
    recipe = RECIPES[key]
    if recipe.blur is not None:
        edge = torch.full((3, 64, 64), 0.2)
        edge[:, :, 32:] = 0.8
        a, b = both_paths(only(recipe, "blur"), edge, 64)
        same("blur", a[:, 0, 32, 31], b[:, 0, 32, 31])  # the pixel beside the step: how much it was blurred
        blurred = a[:, 0, 32, 31] > 0.2 + 1e-3
        assert 0.5 * recipe.blur.p < float(blurred.float().mean()) <= recipe.blur.p + 0.05
    if recipe.noise_sigma:
        a, b = both_paths(only(recipe, "noise_sigma"), torch.full((1, 32, 32), 0.5), 32)
        std_a, std_b = ((out - 0.5).flatten(1).std(1) for out in (a, b))
        same("noise std", std_a, std_b)
        assert abs(float(std_a.mean()) - recipe.noise_sigma) < 0.01
    if recipe.erasing is not None:
        a, b = both_paths(only(recipe, "erasing"), torch.ones(1, 32, 32), 32)
        erased_a, erased_b = ((out == recipe.erasing.value).flatten(1).float().mean(1) for out in (a, b))
        same("erased area", erased_a, erased_b)
        rate("erasing", erased_a > 0, recipe.erasing.p)


# ----- one definition -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["digits", "cifar", "imagenet"])
@pytest.mark.parametrize("views", [1, 2])
def test_both_paths_read_the_familys_recipe(family, views):
    t = build_transforms(family, True, views)
    item = t.transform if views > 1 else t
    loader = InMemoryAugmentedLoader(torch.zeros(2, 3, 8, 8), torch.zeros(2), 2, family=family, views=views)
    assert item.recipe is loader.recipe is recipe_for(family, views > 1)


def test_batched_hue_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(6, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    x[0] = 0.4  # grey pixels keep their value
    shift = torch.linspace(-0.5, 0.5, 6)
    out = adjust_hue(x, shift)
    for i in range(6):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], float(shift[i])), atol=2e-6, rtol=0)


def test_bad_recipe_values_name_the_field():
    from fct_lightning.data.recipes import Jitter

    with pytest.raises(ValueError, match=r"Recipe.flip_p=1.5 is invalid; allowed: a probability in \[0, 1\]"):
        Recipe("x", flip_p=1.5)
    with pytest.raises(ValueError, match=r"ResizedCrop.scale=\(0.9, 0.1\)"):
        ResizedCrop((0.9, 0.1))
    with pytest.raises(ValueError, match=r"Jitter.hue=0.7"):
        Jitter(hue=0.7)
    with pytest.raises(ValueError, match="family='mnist'"):
        recipe_for("mnist", False)
