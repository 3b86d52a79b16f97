"""fct-fit's own callbacks: a progress bar that does not redraw on every step, and the user's choice wins."""

from __future__ import annotations

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from fct_lightning.commands.fit import PROGRESS_REFRESH_STEPS, build_cli

BASE = ["--stage", "old", "--trainer.logger", "false", "--model.width", "4"]


def bars(cli) -> list[ProgressBar]:
    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_default_bar_redraws_every_few_steps(tmp_path):
    cli, _ = build_cli([*BASE, "--artifacts", str(tmp_path)])
    (bar,) = bars(cli)
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == PROGRESS_REFRESH_STEPS > 1


def test_no_bar_when_disabled(tmp_path):
    cli, _ = build_cli([*BASE, "--artifacts", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert bars(cli) == []


def test_user_bar_is_kept(tmp_path):
    cli, _ = build_cli([*BASE, "--artifacts", str(tmp_path), "--trainer.callbacks+=TQDMProgressBar",
                        "--trainer.callbacks.refresh_rate", "3"])
    (bar,) = bars(cli)
    assert bar.refresh_rate == 3


def test_compile_adds_to_a_preset_callback_list(tmp_path):
    """The README's way to compile: appended to the gpu-fast preset's callbacks, which stay."""
    from fct_lightning.callbacks import ChannelsLast, Compile, Throughput
    from fct_lightning.commands.fit import CONFIG_DIR

    cli, _ = build_cli([*BASE, "--artifacts", str(tmp_path), "--config", str(CONFIG_DIR / "trainer" / "gpu-fast.yaml"),
                        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                        "--trainer.callbacks+=fct_lightning.callbacks.Compile"])
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {ChannelsLast, Throughput, Compile} <= kinds


def test_abbreviated_options_are_errors(tmp_path):
    """`--trainer.max_epoch` (missing its s) must not be taken for --trainer.max_epochs: unknown keys are errors."""
    import pytest

    with pytest.raises(SystemExit):
        build_cli([*BASE, "--artifacts", str(tmp_path), "--trainer.max_epoch", "1"])
