"""The Python API: the example of docs/python_api.md runs as written, h trained on arrays is the transformation
stage's (its checkpoint is the one fct-transform reads), and bad arrays are refused with the argument named."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fct_lightning
from fct_lightning import fit_transformation, transform
from fct_lightning.models.transformation import Transformation

DOC = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_example_runs_and_makes_the_old_gallery_compatible(capsys):
    code = example()
    assert len(code.strip().splitlines()) <= 20
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 - the documentation's own code, as a reader runs it
    before, after = scope["before"], scope["after"]
    assert after["top1"] > before["top1"] + 0.5, (before, after)  # new/old is incompatible; fct+side/old is not
    assert "top-1 of new-model queries" in capsys.readouterr().out


def _items(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    old = (np.random.default_rng(9).normal(size=(4, 12))[labels] + 0.2 * rng.normal(size=(n, 12))).astype(np.float32)
    side = rng.normal(size=(n, 6)).astype(np.float32)
    new = np.tanh(old @ np.random.default_rng(5).normal(size=(12, 10))).astype(np.float32)
    return {"old": old, "side": side, "new": new, "labels": labels}


def test_fit_writes_the_stages_checkpoint_and_transform_reads_it(tmp_path):
    from fct_lightning.stages.checkpoints import read_checkpoint

    train, val = _items(200), _items(80, seed=1)
    ckpt = tmp_path / "h.ckpt"
    h = fit_transformation(train["old"], train["new"], side=train["side"], val=val, epochs=2, batch_size=64,
                           mixer_width=32, checkpoint=ckpt)
    assert isinstance(h, Transformation) and not h.training
    assert (h.old_dim, h.side_dim, h.new_dim) == (12, 6, 10)
    saved = read_checkpoint(ckpt, "transformation")
    assert saved["fct"]["stage"] == "transformation" and saved["fct"]["h"] == h.config
    out = transform(h, val["old"], val["side"])
    assert out.shape == (80, 10) and out.dtype == np.float32
    np.testing.assert_allclose(transform(ckpt, val["old"], val["side"]), out, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(h(torch.from_numpy(val["old"]), torch.from_numpy(val["side"])).numpy(), out,
                                   rtol=1e-5, atol=1e-6)


def test_fit_is_seeded_and_leaves_the_callers_generator_alone():
    train = _items(100)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = fit_transformation(train["old"], train["new"], epochs=1, batch_size=32, mixer_width=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = fit_transformation(train["old"], train["new"], epochs=1, batch_size=32, mixer_width=16, seed=3)
    assert a.side_dim is None
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_bad_arrays_are_refused_by_name():
    train = _items(50)
    with pytest.raises(ValueError, match="different numbers of items"):
        fit_transformation(train["old"], train["new"][:40])
    with pytest.raises(ValueError, match=r"new must be a \[N, d\] float array"):
        fit_transformation(train["old"], train["labels"])
    with pytest.raises(ValueError, match="dimension mismatch: space 'old' is 12-d"):
        fit_transformation(train["old"], train["new"], val={**_items(20), "old": np.zeros((20, 5), np.float32)})
    with pytest.raises(ValueError, match="use_side_info"):
        fit_transformation(train["old"], train["new"], use_side_info=True)
    h = Transformation(12, 10, 6, mixer_width=16).eval()
    with pytest.raises(ValueError, match="old_dim=12"):
        transform(h, np.zeros((3, 7), np.float32), np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="side_dim=6"):
        transform(h, np.zeros((3, 12), np.float32))


def test_the_api_is_exported_lazily():
    """``fct_lightning.fit_transformation`` works, and ``import fct_lightning.store`` still loads no torch."""
    assert fct_lightning.fit_transformation is fit_transformation
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fct_lightning.nope
    code = "import sys, fct_lightning.store; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(DOC.parents[1])})
