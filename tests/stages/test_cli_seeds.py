"""What fct-fit's own options mean: --seed seeds everything random of a run, and no option is abbreviated."""

from __future__ import annotations

import pytest

from fct_lightning.commands.fit import _pre_parser, _run_seed_args, build_cli
from fct_lightning.stages import TransformationModel

BASE = ["--trainer.logger", "false", "--model.width", "4"]


@pytest.mark.parametrize("seed", [0, 3])
def test_run_seed_seeds_the_data_and_the_cached_views(tmp_path, seed):
    old, _ = build_cli(["--stage", "old", "--artifacts", str(tmp_path), "--seed", str(seed), *BASE])
    assert old.datamodule.seed == seed
    # the transformation also draws its cached augmentations from the run seed (its CLI needs trained upstream
    # stages, so the arguments fct-fit adds are checked here)
    assert _run_seed_args(TransformationModel, seed) == ([] if seed == 0 else
                                                        ["--data.seed", "3", "--model.cache_seed", "3"])
    # an explicit data seed wins
    mine, _ = build_cli(["--stage", "old", "--artifacts", str(tmp_path), "--seed", str(seed), *BASE,
                         "--data.seed", "11"])
    assert mine.datamodule.seed == 11


def test_lightning_group_options_are_not_read_as_dataset():
    pre, rest = _pre_parser("fct-fit").parse_known_args(["--stage", "old", "--data=cifar10", "--data", "d.yaml"])
    # None: resolved after parsing (digits, or the dataset the stores record)
    assert pre.dataset is None and rest == ["--data=cifar10", "--data", "d.yaml"]


def test_an_explicit_seed_everything_is_warned_about(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fct_lightning.commands.fit"):
        cli, _ = build_cli(["--stage", "old", "--artifacts", str(tmp_path), *BASE, "--seed_everything", "7"])
    assert cli.config["seed_everything"] == 7 and "same initial weights" in caplog.text
