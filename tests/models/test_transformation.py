"""The FCT transformation h(old, side)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fct_lightning.models.transformation import Transformation


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_shapes_and_parameter_count():
    h = Transformation()
    assert _n_params(h) == pytest.approx(5.7e6, rel=0.01)
    out = h(torch.randn(4, 128), torch.randn(4, 128))
    assert out.shape == (4, 128)


def test_no_side_info_mode():
    h = Transformation(old_dim=16, new_dim=8, side_dim=None, mixer_width=32)
    assert not h.has_side_info and h.side_branch is None
    assert h.mixer[0][0].in_features == 16  # 2 * new_dim: the old branch alone
    assert h(torch.randn(5, 16)).shape == (5, 8)


def test_uncertainty_head():
    h = Transformation(old_dim=16, new_dim=8, side_dim=4, mixer_width=32, uncertainty=True, uncertainty_dim=3)
    old, side = torch.randn(5, 16), torch.randn(5, 4)
    pred, log_var = h.forward_with_uncertainty(old, side)
    assert pred.shape == (5, 8) and log_var.shape == (5, 3)
    h.eval()
    torch.testing.assert_close(h.forward_with_uncertainty(old, side)[0], h(old, side))
    with pytest.raises(RuntimeError, match="uncertainty=True"):
        Transformation(old_dim=4, new_dim=4, side_dim=None, mixer_width=8).forward_with_uncertainty(
            torch.randn(2, 4)
        )


def test_input_errors():
    h = Transformation(old_dim=16, new_dim=8, side_dim=4, mixer_width=32)
    with pytest.raises(ValueError, match=r"old_dim=16.*got \(3, 12\).*old model checkpoint"):
        h(torch.randn(3, 12), torch.randn(3, 4))
    with pytest.raises(ValueError, match="expects side-info of dimension side_dim=4"):
        h(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"side_dim=4.*got \(3, 5\).*side_info model checkpoint"):
        h(torch.randn(3, 16), torch.randn(3, 5))
    with pytest.raises(ValueError, match="3 rows but side has 2"):
        h(torch.randn(3, 16), torch.randn(2, 4))
    no_side = Transformation(old_dim=16, new_dim=8, side_dim=None, mixer_width=32)
    with pytest.raises(ValueError, match="side_dim=None"):
        no_side(torch.randn(3, 16), torch.randn(3, 4))


@pytest.mark.parametrize(
    "kwargs", [{"old_dim": 0}, {"mixer_depth": 0}, {"side_dim": -1}, {"new_dim": 2.5}, {"uncertainty_dim": 0}]
)
def test_constructor_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Transformation(**kwargs)


def test_mixer_depth_and_width():
    h = Transformation(old_dim=4, new_dim=4, side_dim=4, mixer_width=16, mixer_depth=3)
    assert len(h.mixer) == 3
    assert h.head.in_features == 16 and h.head.bias is not None


def test_set_bn_eval_survives_train():
    h = Transformation(old_dim=4, new_dim=4, side_dim=4, mixer_width=16)
    bns = [m for m in h.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 6
    h.set_bn_eval()
    assert h.training and not any(bn.training for bn in bns)
    before = [bn.running_mean.clone() for bn in bns]
    h(torch.randn(8, 4), torch.randn(8, 4)).sum().backward()
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns, strict=True))
    h.train()  # Lightning does this at every epoch start
    assert not any(bn.training for bn in bns)
    h.set_bn_eval(False)
    assert all(bn.training for bn in bns)


def _fit(h: Transformation, old, side, target, steps: int = 300) -> None:
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    h.train()
    for _ in range(steps):
        pred = h(old, side if h.has_side_info else None)
        loss = nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h.eval()


def test_recovers_function_of_old_and_side():
    g = torch.Generator().manual_seed(0)
    n, d_old, d_side, d_new = 2048, 8, 8, 6
    a = torch.randn(d_old, d_new, generator=g) / d_old**0.5
    b = torch.randn(d_side, d_new, generator=g) / d_side**0.5

    def make(n_items):
        old, side = torch.randn(n_items, d_old, generator=g), torch.randn(n_items, d_side, generator=g)
        return old, side, torch.tanh(old @ a) + torch.tanh(side @ b)

    old, side, target = make(n)
    old_t, side_t, target_t = make(512)  # held out
    torch.manual_seed(0)
    with_side = Transformation(old_dim=d_old, new_dim=d_new, side_dim=d_side, mixer_width=64)
    without = Transformation(old_dim=d_old, new_dim=d_new, side_dim=None, mixer_width=64)
    _fit(with_side, old, side, target)
    _fit(without, old, None, target)
    with torch.no_grad():
        mse_side = nn.functional.mse_loss(with_side(old_t, side_t), target_t).item()
        mse_plain = nn.functional.mse_loss(without(old_t), target_t).item()
    variance = target_t.var().item()
    assert mse_side < 0.1 * variance
    assert mse_side < 0.25 * mse_plain  # the target depends on side: h(old) alone cannot fit it


@pytest.mark.parametrize("side_dim", [6, None])
def test_transform_stored_batches_in_eval_mode(side_dim):
    """Stored features through h in batches: the eval-mode forward pass, whatever the batch size; the module's
    mode (and frozen BatchNorm) is restored afterwards."""
    torch.manual_seed(0)
    h = Transformation(8, 5, side_dim, 2, 16, 1, uncertainty=True, uncertainty_dim=3).train()
    h.set_bn_eval(True)
    old = torch.randn(23, 8, dtype=torch.float64)  # any float dtype: batches are cast to float32
    side = None if side_dim is None else torch.randn(23, side_dim)
    pred, log_var = h.transform_stored(old, side, batch_size=5, uncertainty=True, out_device="cpu")
    h.eval()
    want, want_var = h.forward_with_uncertainty(old.float(), side)
    h.train()
    torch.testing.assert_close(pred, want.detach())
    torch.testing.assert_close(log_var, want_var.detach().mean(dim=1))
    assert h.training and not any(m.training for m in h.modules() if isinstance(m, nn.BatchNorm1d))
    assert h.transform_stored(old, side, batch_size=100)[1] is None
    if side_dim is not None:
        with pytest.raises(ValueError, match="23 rows but side-info has 4"):
            h.transform_stored(old, side[:4])
