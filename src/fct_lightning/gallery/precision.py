"""How h runs when it transforms a gallery: ``fp32``, ``bf16`` (autocast, GPU or CPU) or ``int8`` (CPU).

``int8`` is PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``: int8 weights, one scale per
output channel; activations quantised per batch, to 7 bits in fbgemm's x86 kernels) of every ``nn.Linear``, after
each eval-mode BatchNorm is folded into the Linear before it (h's blocks are Linear -> BatchNorm -> ReLU), so the
quantised model runs no separate normalisation pass. Its error against fp32 is mostly the activations' rounding:
about 2 % relative L2 on a trained h, whatever the weights' granularity.
:func:`compare` measures what a precision costs against fp32 on the same rows.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fct_lightning.models.transformation import Transformation

PRECISIONS = ("fp32", "bf16", "int8")
Runner = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
"""``run(old, side) -> (pred [B, new_dim] float32, log-variance per row [B, 1] float32 or None)``."""


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if it runs on ``device``; a ValueError naming ``--precision`` otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"--precision int8 runs on the CPU only (dynamic quantisation has CPU kernels), not on "
                         f"{device}; pass --device cpu, or use --precision bf16 on the GPU")
    return precision


def fold_batchnorm(h: nn.Module) -> nn.Module:
    """A copy of ``h`` (eval mode) with each ``Linear -> BatchNorm1d`` pair merged into one Linear with a bias.

    ``BN(Wx + b) = g * (Wx + b - mean) / sqrt(var + eps) + beta``: the same function up to float rounding.
    """
    h = copy.deepcopy(h).eval()
    for seq in [m for m in h.modules() if isinstance(m, nn.Sequential)]:
        mods = list(seq)
        for k in range(len(mods) - 1):
            lin, bn = mods[k], mods[k + 1]
            if not (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats):
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            bias = lin.bias.detach() if lin.bias is not None else torch.zeros_like(bn.running_mean)
            fused = nn.Linear(lin.in_features, lin.out_features, bias=True)
            with torch.no_grad():
                fused.weight.copy_(lin.weight * scale[:, None])
                fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
            seq[k], seq[k + 1] = fused, nn.Identity()
    return h


def quantize_int8(h: nn.Module) -> nn.Module:
    """h with BatchNorm folded and every Linear dynamically quantised to int8 (CPU)."""
    quantize = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize is None or not hasattr(quantize, "quantize_dynamic"):
        raise ValueError(f"--precision int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                         f"{torch.__version__} does not have; use --precision fp32 or bf16")
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works
        warnings.simplefilter("ignore")
        return quantize.quantize_dynamic(fold_batchnorm(h), {nn.Linear: quantize.per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)


def runner(h: Transformation, precision: str, device: torch.device) -> Runner:
    """The function that applies h at ``precision`` on ``device`` (h already there, in eval mode)."""
    model: nn.Module = quantize_int8(h) if precision == "int8" else h
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    uncertain = h.uncertainty_head is not None

    @torch.no_grad()
    def run(old: Tensor, side: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with autocast():
            if uncertain:
                pred, log_var = model.forward_with_uncertainty(old, side)
                return pred.float(), log_var.float().reshape(len(pred), -1).mean(dim=1, keepdim=True)
            return model(old, side).float(), None

    return run


def compare(reference: Tensor, got: Tensor) -> dict[str, float]:
    """``max_abs`` and ``rel_l2`` (``||got - ref|| / ||ref||``, over the whole block) of ``got`` against fp32."""
    diff = (got.float() - reference.float()).double()
    return {"max_abs": float(diff.abs().max()),
            "rel_l2": float(diff.norm() / reference.double().norm().clamp_min(1e-30))}
