"""The FCT transformation h(old embedding, side-info) -> new embedding, with FastFill's uncertainty head.

The layout follows the FCT reference (``MLP_BN_SIDE_PROJECTION``, written there with 1x1 convolutions):
two branches of Linear-BN-ReLU blocks, one for the old embedding and one for the side-information, whose
outputs are concatenated and mixed by a wider Linear-BN-ReLU stack and a final linear layer.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

__all__ = ["Transformation"]


def _block(d_in: int, d_out: int) -> nn.Sequential:
    """Linear (no bias, BN follows) -> BatchNorm1d -> ReLU."""
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True))


def _branch(d_in: int, width_factor: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(_block(d_in, width_factor * d_in), _block(width_factor * d_in, d_out))


class Transformation(nn.Module):
    """h: (old embedding, side-info) -> new-model embedding space.

    Old branch: ``old_dim -> branch_width_factor * old_dim -> 2 * new_dim``; side branch likewise from
    ``side_dim``. Their concatenation (``4 * new_dim``, or ``2 * new_dim`` without side-info) feeds
    ``mixer_depth`` Linear-BN-ReLU blocks of width ``mixer_width`` and a final ``Linear(mixer_width,
    new_dim)`` with bias. At the defaults (128-d everything) this has about 5.7M parameters.

    With ``uncertainty=True`` a small MLP on the mixer's last hidden feature predicts a log-variance per
    item (FastFill); read it with :meth:`forward_with_uncertainty`. :meth:`forward` returns the
    prediction only.

    Args:
        old_dim: Old model's embedding dimension.
        new_dim: New model's embedding dimension.
        side_dim: Side-info dimension, or ``None`` for the no-side-info transformation h(old).
        branch_width_factor: Hidden width of each branch, as a multiple of its input dimension.
        mixer_width: Width of the mixer's hidden layers.
        mixer_depth: Number of Linear-BN-ReLU blocks in the mixer (at least 1).
        uncertainty: Add the FastFill uncertainty head.
        uncertainty_dim: Output size of the uncertainty head (1: one log-variance per item).
    """

    def __init__(
        self,
        old_dim: int = 128,
        new_dim: int = 128,
        side_dim: int | None = 128,
        branch_width_factor: int = 2,
        mixer_width: int = 2048,
        mixer_depth: int = 2,
        uncertainty: bool = False,
        uncertainty_dim: int = 1,
    ) -> None:
        super().__init__()
        for name, value in [
            ("old_dim", old_dim),
            ("new_dim", new_dim),
            ("branch_width_factor", branch_width_factor),
            ("mixer_width", mixer_width),
            ("mixer_depth", mixer_depth),
            ("uncertainty_dim", uncertainty_dim),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if side_dim is not None and (not isinstance(side_dim, int) or side_dim < 1):
            raise ValueError(f"side_dim must be a positive integer or None (no side-info), got {side_dim!r}")
        self.old_dim, self.new_dim, self.side_dim = old_dim, new_dim, side_dim
        self.uncertainty = uncertainty
        self.old_branch = _branch(old_dim, branch_width_factor, 2 * new_dim)
        self.side_branch = None if side_dim is None else _branch(side_dim, branch_width_factor, 2 * new_dim)
        mixer_in = 2 * new_dim if side_dim is None else 4 * new_dim
        widths = [mixer_in] + [mixer_width] * mixer_depth
        self.mixer = nn.Sequential(*(_block(a, b) for a, b in itertools.pairwise(widths)))
        self.head = nn.Linear(mixer_width, new_dim)
        self.uncertainty_head = (
            nn.Sequential(
                nn.Linear(mixer_width, new_dim), nn.ReLU(inplace=True), nn.Linear(new_dim, uncertainty_dim)
            )
            if uncertainty
            else None
        )
        self._bn_frozen = False
        self.config = {"old_dim": old_dim, "new_dim": new_dim, "side_dim": side_dim,
                       "branch_width_factor": branch_width_factor, "mixer_width": mixer_width,
                       "mixer_depth": mixer_depth, "uncertainty": uncertainty, "uncertainty_dim": uncertainty_dim}
        """The constructor arguments: ``Transformation(**h.config)`` builds the same architecture."""

    @property
    def has_side_info(self) -> bool:
        """Whether this h takes side-information."""
        return self.side_dim is not None

    def _check_inputs(self, old: Tensor, side: Tensor | None) -> None:
        if old.dim() != 2 or old.shape[1] != self.old_dim:
            raise ValueError(
                f"old embeddings must have shape [B, old_dim={self.old_dim}], got {tuple(old.shape)}; "
                "set Transformation(old_dim=...) to the old model checkpoint's embedding dimension"
            )
        if self.side_dim is None:
            if side is not None:
                raise ValueError(
                    "side-info was passed, but this Transformation has side_dim=None (no side-info); "
                    "build it with side_dim=<side-info model's dimension> or call it without side"
                )
            return
        if side is None:
            raise ValueError(
                f"this Transformation expects side-info of dimension side_dim={self.side_dim}; pass side "
                "(the side_info model's embedding) or build it with side_dim=None for h(old) alone"
            )
        if side.dim() != 2 or side.shape[1] != self.side_dim:
            raise ValueError(
                f"side-info must have shape [B, side_dim={self.side_dim}], got {tuple(side.shape)}; "
                "set Transformation(side_dim=...) to the side_info model checkpoint's embedding dimension"
            )
        if side.shape[0] != old.shape[0]:
            raise ValueError(f"old has {old.shape[0]} rows but side has {side.shape[0]}; they must match")

    def _hidden(self, old: Tensor, side: Tensor | None) -> Tensor:
        self._check_inputs(old, side)
        x = self.old_branch(old)
        if self.side_branch is not None:
            x = torch.cat([x, self.side_branch(side)], dim=1)
        return self.mixer(x)

    def forward(self, old: Tensor, side: Tensor | None = None) -> Tensor:
        """Transform old embeddings into the new embedding space.

        Args:
            old: Old-model embeddings, shape ``[B, old_dim]``.
            side: Side-info, shape ``[B, side_dim]``; must be ``None`` exactly when ``side_dim`` is None.

        Returns:
            Predicted new embeddings, shape ``[B, new_dim]``.
        """
        return self.head(self._hidden(old, side))

    def forward_with_uncertainty(self, old: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prediction and FastFill log-variance from one pass.

        Args:
            old: Old-model embeddings, shape ``[B, old_dim]``.
            side: Side-info, shape ``[B, side_dim]``, or ``None`` without side-info.

        Returns:
            ``(pred, log_var)`` of shapes ``[B, new_dim]`` and ``[B, uncertainty_dim]``.

        Raises:
            RuntimeError: If the model was built with ``uncertainty=False``.
        """
        if self.uncertainty_head is None:
            raise RuntimeError(
                "forward_with_uncertainty needs the uncertainty head; build Transformation(uncertainty=True)"
            )
        hidden = self._hidden(old, side)
        return self.head(hidden), self.uncertainty_head(hidden)

    @torch.no_grad()
    def transform_stored(self, old: Tensor, side: Tensor | None = None, batch_size: int = 65536,
                         uncertainty: bool = False,
                         out_device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
        """Apply h to stored features in eval mode, ``batch_size`` rows at a time (the mode is restored after).

        Each batch moves to this module's device on its own, so a stored gallery larger than the device's memory
        can stay on the host (with ``out_device="cpu"``).

        Args:
            old: Stored old embeddings ``[N, old_dim]``, on any device.
            side: Stored side-info ``[N, side_dim]``, or None without side-info.
            batch_size: Rows per forward pass.
            uncertainty: Also return each item's FastFill log-variance, averaged over its dims.
            out_device: Where the results go; None = this module's device.

        Returns:
            ``(pred [N, new_dim], log_var [N] or None)``, float32.
        """
        if side is not None and len(side) != len(old):
            raise ValueError(f"stored old features have {len(old)} rows but side-info has {len(side)}; they must align")
        dev = next(self.parameters()).device
        out_device = dev if out_device is None else out_device
        was_training = self.training
        self.eval()
        preds, unc = [], []
        try:
            for i in range(0, len(old), batch_size):
                o = old[i:i + batch_size].to(dev, torch.float32)
                sd = None if side is None else side[i:i + batch_size].to(dev, torch.float32)
                if uncertainty:
                    pred, log_var = self.forward_with_uncertainty(o, sd)
                    unc.append(log_var.float().reshape(len(pred), -1).mean(dim=1).to(out_device))
                else:
                    pred = self(o, sd)
                preds.append(pred.float().to(out_device))
        finally:
            self.train(was_training)
        return torch.cat(preds), torch.cat(unc) if uncertainty else None

    def set_bn_eval(self, frozen: bool = True) -> None:
        """Put every BatchNorm layer in eval mode (running statistics frozen), or release them.

        The FCT reference switches BN to eval for the second half of training. The setting survives
        later ``train()`` calls (Lightning calls ``train()`` at every epoch start) until
        ``set_bn_eval(False)``.

        Args:
            frozen: ``True`` to freeze BN statistics, ``False`` to follow ``self.training`` again.
        """
        self._bn_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> Transformation:
        """Set train/eval mode, keeping BatchNorm in eval mode after :meth:`set_bn_eval`."""
        super().train(mode)
        if self._bn_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
