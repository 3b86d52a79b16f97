"""Every shipped config parses, instantiates and (in chain order) trains one batch on tiny generated data.

Three kinds of configs ship under ``src/fct_lightning/configs``:

* stage configs ``<dataset>/<stage>.yaml`` (loaded by ``fct-fit --stage S --dataset D``);
* recipes ``recipes/<name>/<stage>.yaml``, override files passed with ``--config`` on top of a stage config;
* trainer presets ``trainer/<name>.yaml`` (only a ``trainer:`` section).

Fast tests (default suite): every config is instantiated through :func:`fct_lightning.commands.fit.build_cli`
(datamodule, model, trainer; no fitting) on generated folder trees with the real number of classes, and the whole chain
``old -> side_info -> new -> transformation (with and without side-info) -> bct -> closed-form h (linear with and
without side-info, procrustes)`` trains one batch per stage on tiny CIFAR-10 data (ImageFolder layout). Upstream
checkpoints for the transformation and closed-form configs come from models built with the upstream configs (written
without training).

Slow tests (``-m slow``): the chain on CIFAR-100 (torchvision pickles), on the ImageNet-style datasets (at
``--data.image_size 32`` for speed; every other value is the config's own) and with the ResNet-50 CIFAR-100
recipe, and the DDP preset on two CPU processes.
``fast_dev_run`` is not used for chains: Lightning's ModelCheckpoint skips saving under it (no ``best.ckpt``, which
the downstream stages need), so a chain stage runs ``max_epochs 1`` with one training and one validation batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from fct_lightning import chain
from fct_lightning.commands.fit import CONFIG_DIR, build_cli, fit
from fct_lightning.data.cifar import CIFAR10_CLASSES
from fct_lightning.stages.checkpoints import read_checkpoint
from tests.data.fakes import make_cifar_pickles, make_imagefolder

CHAIN = ("old", "side_info", "new", "transformation", "bct")
CLOSED_FORM = ("linear", "linear_noside", "procrustes")  # variants of the closed_form stage (one config for the three)
ORTHOGONAL = ("orthogonal", "orthogonal_side")  # variants of the orthogonal stage (one config for both)
STAGE_CONFIGS = (*CHAIN, "closed_form", "orthogonal")  # the stage configs each dataset and recipe ships
H_STAGES = ("transformation", "closed_form", "orthogonal")  # stages built on upstream old/side_info/new checkpoints
DATASETS = ("digits", "cifar10", "cifar100", "imagenet", "places365", "vggface2", "folder")
RECIPES = {"cifar100_resnet50": "cifar100", "cifar10_cpu": "cifar10", "folder_cpu": "folder"}  # recipe -> dataset
RECIPE_TRUNKS = {"cifar100_resnet50": ("ResNet", 2048), "cifar10_cpu": ("SmallConvNet", 32),
                 "folder_cpu": ("SmallConvNet", 32)}  # trunk, feature dim
# every trainer preset, the four basic ones and any added later (e.g. presets with a data section)
PRESETS = tuple(sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")))
BASIC_PRESETS = ("cpu", "gpu", "ddp", "bf16")
# (--stage, extra args): the transformation runs with and without side-info; the closed-form h as each variant
VARIANTS = [(s, []) for s in CHAIN[:3]] + [("transformation", []),
                                           ("transformation", ["--model.use_side_info", "false"]), ("bct", [])] + \
    [(v, []) for v in (*CLOSED_FORM, *ORTHOGONAL)]
VARIANT_IDS = ["old", "side_info", "new", "transformation", "transformation_noside", "bct", *CLOSED_FORM, *ORTHOGONAL]
VARIANT_PARAMS = [(*v, name) for v, name in zip(VARIANTS, VARIANT_IDS, strict=True)]

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
# one epoch of one batch, validated (recipes that validate every few epochs would otherwise write no best.ckpt)
ONE_BATCH = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1"]
# speed only: 2 cached views instead of 10 keep the feature cache (3 frozen backbones x views x images) small
FAST_CACHE = ["--model.cache_views", "2"]
# ImageNet-style datasets are 224 px; 32 px keeps a ResNet-50 step on 2 CPU cores at about a second
SMALL_IMAGES = ["--data.image_size", "32"]


def config_stage(stage: str) -> str:
    """The stage whose config ``fct-fit --stage <stage>`` loads (``linear`` -> ``closed_form``)."""
    return chain.get(stage).stage


# --------------------------------------------------------------------------------------------- fake datasets
def _class_names(dataset: str, small: bool = False) -> tuple[list[str], list[str]]:
    """(training classes, evaluation classes) in the real datasets' numbers (VGGFace2 ``small``: 20 + 6)."""
    if dataset == "imagenet":
        names = [f"n{i:08d}" for i in range(1000)]
        return names, names
    if dataset == "places365":
        names = [f"place_{i:03d}" for i in range(365)]
        return names, names
    if dataset == "folder":  # a user's own images: any class count (the configs take half of it, as a fraction)
        names = [f"product_{i:02d}" for i in range(41)]
        return names, names
    # VGGFace2: 8631 training identities, 500 disjoint test identities, interleaved in sorted order
    ids = [f"n{i:06d}" for i in range(1, 27 if small else 9132)]
    test = set(ids[::4][:6] if small else ids[::18][:500])
    return [n for n in ids if n not in test], sorted(test)


EVAL_DIR = {"imagenet": "val", "places365": "val", "vggface2": "test", "folder": "val"}


def make_data(dataset: str, root: Path, images: bool, small: bool = False) -> Path:
    """A tiny tree in ``dataset``'s layout under ``root`` with the real class count; returns ``--data.root``.

    ``images=False`` writes empty class folders for the ImageNet-style datasets (enough to instantiate: the
    datamodule only lists class folders until ``setup``); ``images=True`` two training images per class (one of
    them held out for validation, ``val_fraction``) and a few evaluation images. The CIFAR sets always hold
    images, as few as a one-batch chain needs (CPU time).
    """
    if dataset == "digits":
        return root  # scikit-learn's bundled digits; root unused
    if dataset == "cifar10":  # the offline archive's layout: <root>/cifar10/{train,test}/<class>/NNNN.jpg
        make_imagefolder(root / "cifar10", CIFAR10_CLASSES, {"train": 2, "test": 1}, size=32)
        return root
    if dataset == "cifar100":  # torchvision's pickles: two training images per class (BCT needs every class), 20 test
        make_cifar_pickles(root, 100, train_per_batch=40, num_test=20)
        return root
    train, evaluation = _class_names(dataset, small)
    eval_dir = EVAL_DIR[dataset]
    if images:
        shown = evaluation[:6]
        make_imagefolder(root, sorted(set(train) | set(evaluation)), {"train": 2, eval_dir: 2}, size=16,
                         classes_by_split={"train": train, eval_dir: shown})
    else:
        for split, names in (("train", train), (eval_dir, evaluation)):
            for name in names:
                (root / split / name).mkdir(parents=True, exist_ok=True)
    if dataset == "vggface2":  # training identities first, then the test identities (see configs/vggface2)
        (root / "classes.txt").write_text("\n".join(train + evaluation) + "\n")
    return root


def config_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def stage_args(stage: str, dataset: str, artifacts: Path, root: Path, *extra: str) -> list[str]:
    return ["--stage", stage, "--dataset", dataset, "--artifacts", str(artifacts), "--data.root", str(root),
            *QUIET, *extra]


def write_untrained_checkpoint(cli, path: Path) -> None:
    """The checkpoint a stage would write, for an untrained model (what the transformation stage loads)."""
    model = cli.model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "fct": model.fct_metadata()}, path)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Class-folder trees of every dataset (no images for the large ones)."""
    base = tmp_path_factory.mktemp("trees")
    return {d: make_data(d, base / d, images=False) for d in DATASETS}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, trees):
    """``get(dataset, recipe_args) -> artifacts dir`` holding untrained old/side_info/new checkpoints."""
    made: dict[tuple, Path] = {}

    def get(dataset: str, recipe: str | None = None) -> Path:
        key = (dataset, recipe)
        if key not in made:
            art = tmp_path_factory.mktemp(f"up-{dataset}-{recipe}")
            for stage in CHAIN[:3]:
                extra = [] if recipe is None else ["--config", str(CONFIG_DIR / "recipes" / recipe / f"{stage}.yaml")]
                cli, _ = build_cli(stage_args(stage, dataset, art, trees[dataset], *extra))
                write_untrained_checkpoint(cli, art / dataset / stage / "best.ckpt")
            made[key] = art
        return made[key]

    return get


# --------------------------------------------------------------------------------------------- coverage
def shipped_configs() -> set[str]:
    return {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml")}


def covered_configs() -> set[str]:
    stages = {f"{d}/{s}.yaml" for d in DATASETS for s in STAGE_CONFIGS} | {f"{d}/data.yaml" for d in DATASETS}
    recipes = {f"recipes/{r}/{s}.yaml" for r in RECIPES for s in STAGE_CONFIGS}
    return stages | recipes | {f"trainer/{p}.yaml" for p in PRESETS} | set(FITTED_ELSEWHERE)


# configs that need inputs these tests do not build (h from embedding stores): parsed and checked here, fitted by
# the test module named
FITTED_ELSEWHERE = {"embeddings/transformation.yaml": "tests/test_embeddings_data.py",
                    "embeddings/orthogonal.yaml": "tests/test_orthogonal.py"}


def version_plans() -> set[str]:
    """The packaged version plans (fct-versions' input, not fct-fit configs): checked by the test below."""
    return {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.glob("*/versions.yaml")}


@pytest.mark.parametrize("name", sorted(version_plans()))
def test_version_plans_parse_and_say_how_to_run(name):
    from fct_lightning.versions import load_plan

    plan = load_plan(name.split("/")[0], CONFIG_DIR / name)
    assert len(plan.versions) >= 2 and plan.source.endswith(name)
    assert "fct-versions" in (CONFIG_DIR / name).read_text().split("\n", 1)[0] or \
        "make " in (CONFIG_DIR / name).read_text().split("\n", 1)[0], name


def test_every_shipped_config_is_tested():
    assert shipped_configs() - version_plans() == covered_configs()
    assert {"digits/versions.yaml", "cifar10/versions.yaml"} <= version_plans()
    root = CONFIG_DIR.parents[2]
    for name, module in FITTED_ELSEWHERE.items():  # that module fits through the config (fct-fit --data embeddings)
        assert '"--data", "embeddings"' in (root / module).read_text(), (name, module)


@pytest.mark.parametrize("name", sorted(covered_configs() - {f"digits/{s}.yaml" for s in (*STAGE_CONFIGS, "data")}))
def test_config_header_says_what_and_how(name):
    """Each config opens with a comment saying what it is and the command that runs it."""
    text = (CONFIG_DIR / name).read_text()
    assert text.startswith("# "), name
    header = text[: text.index("\n" + next(iter(config_values(CONFIG_DIR / name))) + ":")]
    assert "fct-fit --stage" in header, name


@pytest.mark.parametrize("name", sorted(covered_configs()))
def test_config_keys_are_sections(name):
    allowed = {"trainer"} if name in {f"trainer/{p}.yaml" for p in BASIC_PRESETS} else {"trainer", "data", "model"}
    assert set(config_values(CONFIG_DIR / name)) <= allowed, name


# --------------------------------------------------------------------------------------------- instantiate
def check_values(cli, *files: Path, overridden: list[str] = ()) -> None:
    """Values of the config files (later files win) reached the parsed configuration, except for the keys that
    ``overridden`` command-line arguments (``--section.key value ...``) set."""
    skip = {a[2:] for a in overridden if a.startswith("--")}
    want: dict[str, dict] = {}
    for f in files:
        for section, values in config_values(f).items():
            want.setdefault(section, {}).update(values)
    got = cli.config.as_dict()
    for section, values in want.items():
        for key, value in values.items():
            if f"{section}.{key}" in skip:
                continue
            assert got[section][key] == value, f"{section}.{key}: {got[section][key]!r} != {value!r} ({files})"


def check_classes(cli, dataset: str, stage: str) -> None:
    train_classes = cli.config.as_dict()["data"]["train_classes"]
    n = cli.datamodule.num_classes if train_classes is None else train_classes
    if isinstance(n, float):  # a fraction of the classes
        n = int(n * cli.datamodule.num_classes)
    assert cli.datamodule.train_class_ids == list(range(n))
    if stage in ("old", "new", "bct"):
        assert cli.model.classes == list(range(n))
        assert cli.model.classifier.weight.shape[0] == n
    assert cli.model.dataset == dataset


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize(("stage", "extra", "name"), VARIANT_PARAMS, ids=VARIANT_IDS)
def test_stage_config_instantiates(dataset, stage, extra, name, trees, upstream):
    config = config_stage(stage)
    art = upstream(dataset) if config in H_STAGES else trees[dataset].parent / "art"
    cli, ckpt = build_cli(stage_args(stage, dataset, art, trees[dataset], *extra))
    assert ckpt is None
    assert cli.model.stage == config and cli.datamodule.name == dataset
    check_values(cli, CONFIG_DIR / dataset / "data.yaml", CONFIG_DIR / dataset / f"{config}.yaml", overridden=extra)
    check_classes(cli, dataset, config)
    assert cli.out_dir.name == name
    assert chain.variant_of(config, dict(cli.model.hparams)).name == name


def test_real_dataset_class_counts(trees):
    """The class counts the configs rely on: half of each dataset's training classes for the old model."""
    expect = {"cifar10": (10, 5), "cifar100": (100, 50), "imagenet": (1000, 500), "places365": (365, 182),
              "vggface2": (9131, 4315), "folder": (41, 20)}
    for dataset, (num_classes, old_classes) in expect.items():
        cli, _ = build_cli(stage_args("old", dataset, trees[dataset].parent / "art", trees[dataset]))
        assert (cli.datamodule.num_classes, len(cli.model.classes)) == (num_classes, old_classes), dataset
    # VGGFace2: new/bct/transformation train on exactly the 8631 training identities
    assert config_values(CONFIG_DIR / "vggface2" / "new.yaml")["data"]["train_classes"] == 8631


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize(("stage", "extra", "name"), VARIANT_PARAMS, ids=VARIANT_IDS)
def test_recipe_instantiates(recipe, stage, extra, name, trees, upstream):
    dataset, config = RECIPES[recipe], config_stage(stage)
    override = CONFIG_DIR / "recipes" / recipe / f"{config}.yaml"
    art = upstream(dataset, recipe) if config in H_STAGES else trees[dataset].parent / "art-recipe"
    cli, _ = build_cli(stage_args(stage, dataset, art, trees[dataset], "--config", str(override), *extra))
    check_values(cli, CONFIG_DIR / dataset / "data.yaml", CONFIG_DIR / dataset / f"{config}.yaml", override,
                 overridden=extra)
    check_classes(cli, dataset, config)
    assert cli.out_dir.name == name
    if config not in H_STAGES:
        trunk = (cli.model.net.trunk.__class__.__name__, cli.model.net.feature_dim)
        assert trunk == RECIPE_TRUNKS[recipe]


def preset_args(preset: str, trees: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    return stage_args("old", "cifar10", tmp_path / "art", trees["cifar10"],
                      "--config", str(CONFIG_DIR / "trainer" / f"{preset}.yaml"), *extra)


@pytest.mark.parametrize("preset", PRESETS)
def test_trainer_preset_parses(preset, trees, tmp_path, capsys):
    """Parse only (``--print_config`` stops before instantiation), so GPU presets are checked on CPU too."""
    with pytest.raises(SystemExit) as exc:
        build_cli(preset_args(preset, trees, tmp_path, "--print_config"))
    assert exc.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    want = config_values(CONFIG_DIR / "trainer" / f"{preset}.yaml")
    assert "trainer" in want
    for section, values in want.items():
        for key, value in values.items():
            if key != "callbacks":  # printed as resolved class_path/init_args entries
                assert printed[section][key] == value, f"{section}.{key}"
    assert printed["trainer"]["max_epochs"] == 30  # the stage config is still underneath


@pytest.mark.parametrize("preset", PRESETS)
def test_trainer_preset_instantiates(preset, trees, tmp_path):
    """Instantiate the Trainer; without CUDA the accelerator is switched to CPU (everything else kept)."""
    gpu = config_values(CONFIG_DIR / "trainer" / f"{preset}.yaml")["trainer"].get("accelerator") == "gpu"
    extra = ["--trainer.accelerator", "cpu"] if gpu and not torch.cuda.is_available() else []
    benchmark = torch.backends.cudnn.benchmark
    try:
        check_preset(preset, build_cli(preset_args(preset, trees, tmp_path, *extra))[0].trainer)
    finally:  # Trainer(benchmark=...) sets this process-wide flag; later tests must not inherit it
        torch.backends.cudnn.benchmark = benchmark


def check_preset(preset: str, trainer) -> None:
    if preset == "bf16":
        assert trainer.precision == "bf16-mixed"
    if preset == "cpu":
        assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    if preset in ("gpu", "ddp"):
        assert torch.backends.cudnn.benchmark is True
    if preset == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert type(trainer.strategy._layer_sync).__name__ == "TorchSyncBatchNorm"  # sync_batchnorm: true
        assert any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks)


# --------------------------------------------------------------------------------------------- chains
def run_chain(dataset: str, root: Path, art: Path, *extra: str, recipe: str | None = None,
              stage_extra: dict[str, list[str]] | None = None, default_extra: list[str] = ()) -> None:
    """old -> side_info -> new -> transformation (+ no side-info) -> bct -> the closed-form h (linear with and without
    side-info, procrustes), one batch each; checks best.ckpt."""
    for (stage, variant), name in zip(VARIANTS, VARIANT_IDS, strict=True):
        config = config_stage(stage)
        override = [] if recipe is None else ["--config", str(CONFIG_DIR / "recipes" / recipe / f"{config}.yaml")]
        cache = FAST_CACHE if config in H_STAGES else []
        own = (stage_extra or {}).get(stage, list(default_extra))
        cli = fit(stage_args(stage, dataset, art, root, *override, *ONE_BATCH, *cache, *extra, *own, *variant))
        assert (art / dataset / name / "best.ckpt").is_file(), name
        assert any(k.startswith("val/") for k in cli.trainer.callback_metrics), name


@pytest.mark.parametrize("dataset", ["cifar10", pytest.param("cifar100", marks=pytest.mark.slow)])
def test_chain_fits_one_batch(dataset, tmp_path):
    run_chain(dataset, make_data(dataset, tmp_path / "data", images=True), tmp_path / "art")


@pytest.mark.slow
def test_chain_fits_one_batch_own_images(tmp_path):
    """The `folder` dataset (a user's own ImageFolder tree, 41 classes): the old model takes the first half (20)."""
    run_chain("folder", make_data("folder", tmp_path / "data", images=True), tmp_path / "art", *SMALL_IMAGES)
    old = read_checkpoint(tmp_path / "art" / "folder" / "old" / "best.ckpt", "old")["fct"]
    new = read_checkpoint(tmp_path / "art" / "folder" / "new" / "best.ckpt", "new")["fct"]
    assert (old["classes"], new["classes"]) == (list(range(20)), list(range(41)))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["imagenet", "places365"])
def test_chain_fits_one_batch_large_datasets(dataset, tmp_path):
    run_chain(dataset, make_data(dataset, tmp_path / "data", images=True), tmp_path / "art", *SMALL_IMAGES)


@pytest.mark.slow
def test_chain_fits_one_batch_vggface2_disjoint_identities(tmp_path):
    """VGGFace2 layout with test identities disjoint from train ones (classes.txt lists train ids first).

    The real 8631 identities (checked by the instantiate tests) make the cached-feature and BCT passes embed 8631
    images with three ResNet-50s (over ten minutes on 2 CPU cores), so this chain uses 20 training identities and
    halves of them for the old model, overriding only ``train_classes``. After one step, these ResNet-50s' eval-mode
    embeddings exceed float16's range: the feature cache must keep them in float32 (it once stored infinities and
    h's loss was NaN at its first step).
    """
    root = make_data("vggface2", tmp_path / "data", images=True, small=True)
    run_chain("vggface2", root, tmp_path / "art", *SMALL_IMAGES,
              stage_extra={"old": ["--data.train_classes", "10"], "side_info": ["--data.train_classes", "10"]},
              default_extra=["--data.train_classes", "20"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_chain_fits_one_batch(recipe, tmp_path):
    dataset = RECIPES[recipe]
    run_chain(dataset, make_data(dataset, tmp_path / "data", images=True), tmp_path / "art", recipe=recipe)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_preset_two_cpu_processes(tmp_path):
    """The DDP preset on 2 CPU processes, in a subprocess (DDP re-launches argv). Lightning's SyncBatchNorm needs
    GPU modules, so it is switched off here; the fast instantiate test checks that the preset turns it on."""
    root = make_data("cifar10", tmp_path / "data", images=True)
    cmd = [sys.executable, "-m", "fct_lightning.commands.fit",
           *preset_args("ddp", {"cifar10": root}, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                        "--trainer.sync_batchnorm", "false", *ONE_BATCH)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "art" / "cifar10" / "old" / "best.ckpt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_presets_fit_one_batch(tmp_path):
    root = make_data("cifar10", tmp_path / "data", images=True)
    cli = fit(stage_args("old", "cifar10", tmp_path / "art", root, "--config", str(CONFIG_DIR / "trainer/gpu.yaml"),
                         "--config", str(CONFIG_DIR / "trainer/bf16.yaml"), *ONE_BATCH))
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.strategy.root_device.type == "cuda"
    assert (tmp_path / "art" / "cifar10" / "old" / "best.ckpt").is_file()
