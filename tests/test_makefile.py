"""The Makefile's reproduction targets: every target resolves (``make -n``), stages depend on their upstream
checkpoints, every seed trains its own chain, and a missing dataset says where to put it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fct_lightning import chain

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "places365", "vggface2", "folder")
# make target -> the variant fct-fit trains, and the targets it needs: both from the chain's registry
STAGES = {name: v.stage for name, v in chain.VARIANTS.items()}
UPSTREAM = {name: set(v.upstream) for name, v in chain.VARIANTS.items()}

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # SETUP= : do not build the virtual environment; FIT/EVAL/REPORT: plain names to match in the output
    # without the flags of a calling make (`make test -j4` would pass -j on and reorder the printed commands)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", "SETUP=", "FIT=fct-fit", "EVAL=fct-eval",
                           "REPORT=fct-report", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def commands(out: str, program: str) -> list[list[str]]:
    """The printed ``program`` command lines, as the shell would run them (``$(...)`` parts evaluated now)."""
    lines = [line for line in out.splitlines() if line.startswith(program + " ")]
    return [shell_words(line) if "$(" in line else shlex.split(line) for line in lines]


def shell_words(line: str) -> list[str]:
    proc = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True,
                          timeout=30)
    return proc.stdout.splitlines()


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def variant(cmd: list[str]) -> str:
    """The variant an fct-fit command trains."""
    return option(cmd, "--stage")


def test_help_lists_datasets_variants_and_variables():
    out = make("help").stdout
    for word in (*DATASETS, *STAGES, "demo", "test", "SEED", "DATA_ROOT", "TRAINER", "RECIPE", "DEVICES"):
        assert word in out, word


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_stage_target_resolves_with_its_upstream_stages(dataset, tmp_path):
    for target in STAGES:
        out = make("-n", f"{dataset}-{target}", f"ARTIFACTS={tmp_path}").stdout
        fits = commands(out, "fct-fit")
        # the last command trains the target itself; the ones before are exactly its upstream stages
        assert variant(fits[-1]) == target, out
        assert all(c[-2:] == ["--resume", "auto"] for c in fits), out  # fct-fit decides how each stage starts
        assert {option(c, "--stage") for c in fits[:-1]} == UPSTREAM[target], out
        for cmd in fits:
            assert option(cmd, "--dataset") == dataset and option(cmd, "--artifacts") == str(tmp_path)
            assert option(cmd, "--seed") == "0"


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_target_runs_the_whole_chain_then_eval_and_report(dataset, tmp_path):
    out = make("-n", dataset, f"ARTIFACTS={tmp_path}", "POINTS=5").stdout
    fits = commands(out, "fct-fit")
    assert sorted(map(variant, fits)) == sorted(STAGES)
    (ev,), (rep,) = commands(out, "fct-eval"), commands(out, "fct-report")
    assert option(ev, "--out") == f"{tmp_path}/{dataset}/results/seed0.json" and option(ev, "--points") == "5"
    assert option(rep, "--artifacts") == str(tmp_path)
    assert out.index("fct-eval") > max(out.index(" ".join(c[:3])) for c in fits)
    assert out.index("fct-report") > out.index("fct-eval")


def test_finished_stages_are_not_retrained(tmp_path):
    for stage in ("old", "side_info", "new"):
        (tmp_path / "digits" / stage).mkdir(parents=True)
        (tmp_path / "digits" / stage / "done.json").touch()
    out = make("-n", "digits-transformation", f"ARTIFACTS={tmp_path}").stdout
    assert [variant(c) for c in commands(out, "fct-fit")] == ["transformation"]


def test_each_seed_trains_its_own_chain(tmp_path):
    # seed 0 is complete; SEED=1 must train every stage again (in its own folder), not evaluate seed 0's models
    for stage in STAGES:
        (tmp_path / "digits" / stage).mkdir(parents=True)
        (tmp_path / "digits" / stage / "done.json").touch()
    out = make("-n", "digits", f"ARTIFACTS={tmp_path}", "SEED=1").stdout
    fits = commands(out, "fct-fit")
    assert len(fits) == len(STAGES)
    assert {option(c, "--artifacts") for c in fits} == {f"{tmp_path}/seed1"}
    assert {option(c, "--seed") for c in fits} == {"1"}
    (ev,) = commands(out, "fct-eval")
    assert option(ev, "--artifacts") == f"{tmp_path}/seed1"
    assert option(ev, "--out") == f"{tmp_path}/digits/results/seed1.json"  # next to seed 0's, for fct-report
    (rep,) = commands(out, "fct-report")
    assert option(rep, "--artifacts") == str(tmp_path)


def test_presets_recipe_devices_and_extra_reach_every_stage(tmp_path):
    out = make("-n", "cifar10", f"ARTIFACTS={tmp_path}", "DATA_ROOT=/data/c10", "TRAINER=ddp bf16",
               "RECIPE=cifar10_cpu", "DEVICES=8", "EXTRA=--trainer.max_epochs 2").stdout
    fits = commands(out, "fct-fit")
    assert len(fits) == len(STAGES)
    for cmd in fits:
        configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        assert configs[:2] == ["configs/trainer/ddp.yaml", "configs/trainer/bf16.yaml"], cmd
        recipe = configs[2]
        stages = "old|side_info|new|transformation|bct|closed_form|orthogonal"
        assert re.fullmatch(rf"configs/recipes/cifar10_cpu/({stages})\.yaml", recipe)
        assert recipe.endswith(f"/{STAGES[option(cmd, '--stage')]}.yaml")
        for path in configs:
            assert (ROOT / path).is_file(), path
        assert option(cmd, "--trainer.devices") == "8" and option(cmd, "--data.root") == "/data/c10"
        assert option(cmd, "--trainer.max_epochs") == "2"
    (ev,) = commands(out, "fct-eval")
    assert option(ev, "--data_root") == "/data/c10"


@pytest.mark.parametrize("dataset,layout", [("cifar100", "train/<class>/<image>"), ("imagenet", "val/<class>/<image>"),
                                            ("places365", "val/<class>/<image>"), ("vggface2", "test/<class>/<image>"),
                                            ("folder", "train/<class>/<image>")])
def test_missing_dataset_says_where_to_put_it(dataset, layout, tmp_path):
    proc = make(f"{dataset}-old", f"DATA_ROOT={tmp_path}", f"ARTIFACTS={tmp_path / 'art'}", check=False)
    assert proc.returncode != 0
    assert f"{dataset} not found under {tmp_path}" in proc.stderr and layout in proc.stderr, proc.stderr
    assert "DATA_ROOT" in proc.stderr
    assert not (tmp_path / "art").exists()  # nothing ran


@pytest.mark.parametrize(("dataset", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_data_checks_find_torchvision_files_below_the_dataset_name(dataset, folder, tmp_path):
    """data/README.md: torchvision's files may sit in <root>/<folder> or <root>/<dataset>/<folder>."""
    for where in (tmp_path / "a" / folder, tmp_path / "b" / dataset / folder):
        where.mkdir(parents=True)
    for root in ("a", "b"):
        made = make(f"{dataset}-data", f"DATA_ROOT={tmp_path / root}", f"CIFAR10_ARCHIVE={tmp_path / 'none'}")
        assert made.returncode == 0
    (tmp_path / "c" / "cifar-100-python").mkdir(parents=True)  # CIFAR-100's files are not ImageNet
    assert make("imagenet-data", f"DATA_ROOT={tmp_path / 'c'}", check=False).returncode != 0


def test_data_checks_follow_fct_data_root(tmp_path, monkeypatch):
    """fct-fit reads $FCT_DATA_ROOT when --data.root is not given; the Makefile's checks look in the same place."""
    for split in ("train", "val"):
        (tmp_path / "folder" / split / "a").mkdir(parents=True)
    monkeypatch.setenv("FCT_DATA_ROOT", str(tmp_path / "folder"))
    assert make("folder-data").returncode == 0
    monkeypatch.setenv("FCT_DATA_ROOT", str(tmp_path / "nothing"))
    proc = make("folder-data", check=False)
    assert proc.returncode != 0 and f"folder not found under {tmp_path / 'nothing'}" in proc.stderr


def test_missing_cifar10_without_archive_says_where_to_put_it(tmp_path):
    proc = make("cifar10-old", f"DATA_ROOT={tmp_path}", f"ARTIFACTS={tmp_path / 'art'}",
                f"CIFAR10_ARCHIVE={tmp_path / 'none.tar.gz'}", check=False)
    assert proc.returncode != 0
    assert "CIFAR-10 not found" in proc.stderr and "cifar-10-batches-py" in proc.stderr, proc.stderr
    assert not (tmp_path / "art").exists()


def test_a_registered_variant_gets_its_targets(tmp_path):
    """The Makefile's variants come from the registry (fct-chain makefile): a variant registered in Python is a make
    target, with its upstream targets, and part of the whole chain, without editing the Makefile."""
    from fct_lightning.commands.chain import makefile_text

    extra = chain.Variant("transformation_tiny", "transformation", {"use_side_info": True, "uncertainty": False,
                                                                  "mixer_width": 8}, upstream=("old", "new"))
    chain.register(extra)
    try:
        text = makefile_text()
    finally:
        chain.unregister(extra.name)
    mk = tmp_path / "chain.mk"
    mk.write_text(text)
    out = make("-n", "digits-transformation_tiny", f"ARTIFACTS={tmp_path}", f"CHAIN_MK={mk}").stdout
    assert [variant(c) for c in commands(out, "fct-fit")] == ["old", "new", "transformation_tiny"], out
    out = make("-n", "digits", f"ARTIFACTS={tmp_path}", f"CHAIN_MK={mk}").stdout
    assert "transformation_tiny" in {variant(c) for c in commands(out, "fct-fit")}
