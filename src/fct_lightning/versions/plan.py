"""A chain of model versions v1 -> v2 -> ... -> vK: the plan (a YAML file) and the fct-fit runs that train it.

Users do not update once. A *version plan* lists the versions in order; each one is either a model of the FCT chain
(``variant: old`` / ``variant: new``, trained where ``make <dataset>`` trains them) or a model trained for the plan
(``stage: new`` with ``classes: N``, the first N classes, and its own ``seed``)::

    transformation: transformation   # the registered variant trained for every update (here h(old, side) -> new)
    direct: true                     # also train h from the first version straight to the last
    versions:
      - {name: v1, variant: old}     # the chain's old model
      - {name: v2, stage: new, classes: 7, seed: 7}
      - {name: v3, variant: new}     # the chain's new model

Side-information is computed once, at v1, by the chain's ``side_info`` model: every h of the plan takes the same
side-info features (the images are not at hand after v1). The update ``vi -> vi+1`` trains the transformation variant
with ``old = vi``, ``new = vi+1``; with ``direct``, ``v1 -> vK`` too (the chain's own transformation when v1 and vK are
the chain's old and new models). :func:`plan_steps` lays the runs out, :func:`run_steps` runs those not done yet,
each by the given runner (fct-versions: its own ``fct-fit`` process, so ``--trainer.devices 8`` and
torchrun work as for any stage).

Folders: a plan's own run ``S`` (``v2``, ``v1-v2``) has ``<artifacts>/<dataset>/versions/S`` as its artifacts
root, i.e. its checkpoints in ``<artifacts>/<dataset>/versions/S/<dataset>/<variant>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fct_lightning import chain
from fct_lightning.runs import DONE_FILE, stage_dir, start_mode

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: the plan's file in a dataset's packaged configs (``configs/<dataset>/versions.yaml``)
PLAN_FILE = "versions.yaml"
#: version models are image models of these stages
VERSION_STAGES = ("old", "new")
#: the chain variants h may stand on: the old, side-info and new roles
H_ROLES = {"old", "side_info", "new"}


@dataclass(frozen=True)
class Version:
    """One model version.

    Attributes:
        name: What tables call it (``v1``); also its folder when the plan trains it.
        variant: A chain variant (``old``, ``new``) whose model this version is, or None.
        stage: Otherwise the stage that trains it (``new``; ``old`` uses the old model's config).
        classes: The first ``classes`` classes it is trained on (None: the stage config's choice).
        seed: Added to ``100 * --seed``: the version's fct-fit ``--seed`` (distinct from the chain's models).
        args: More fct-fit options for this version alone (e.g. ``[--model.backbone, resnet34]``).
    """

    name: str
    variant: str | None = None
    stage: str | None = None
    classes: int | None = None
    seed: int = 0
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The versions in order, the transformation variant every update trains, and whether to train ``v1 -> vK``."""

    versions: tuple[Version, ...]
    transformation: str = "transformation"
    direct: bool = True
    source: str = ""

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.versions]

    @property
    def updates(self) -> list[tuple[int, int]]:
        """``(i, j)`` version positions of every h: consecutive pairs, then ``(0, K - 1)`` with ``direct``."""
        k = len(self.versions)
        pairs = [(i, i + 1) for i in range(k - 1)]
        return pairs + ([(0, k - 1)] if self.direct and k > 2 else [])

    @property
    def uses_side_info(self) -> bool:
        return "side_info" in chain.get(self.transformation).upstream


@dataclass(frozen=True)
class Step:
    """One fct-fit run of a plan: the model it makes (``checkpoint``) and the arguments that make it.

    Attributes:
        name: ``v2`` (a version) or ``v1-v2`` (an update's h); a chain variant's name for chain models.
        argv: fct-fit's arguments.
        out: The run's folder (``best.ckpt``, ``done.json``).
        upstream: The checkpoints it is trained from (a run older than one of them is trained anew).
    """

    name: str
    argv: tuple[str, ...]
    out: Path
    upstream: tuple[Path, ...] = field(default=())

    @property
    def checkpoint(self) -> Path:
        return self.out / "best.ckpt"


def _fail(source: str, message: str) -> ValueError:
    return ValueError(f"version plan {source}: {message}")


def _version(entry: Any, source: str, position: int) -> Version:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise _fail(source, f"version {position + 1} must be a mapping with a name (e.g. {{name: v2, stage: new, "
                            f"classes: 7}}), got {entry!r}")
    known = {"name", "variant", "stage", "classes", "seed", "args"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise _fail(source, f"version {entry['name']!r} has unknown keys {unknown}; allowed: {sorted(known)}")
    name, variant, stage = entry["name"], entry.get("variant"), entry.get("stage")
    if (variant is None) == (stage is None):
        raise _fail(source, f"version {name!r} needs exactly one of variant (a chain model: old, new) or stage (a "
                            f"model trained for the plan: {', '.join(VERSION_STAGES)})")
    if variant is not None:
        if variant not in chain.VARIANTS or chain.get(variant).stage not in VERSION_STAGES:
            allowed = [v for v, x in chain.VARIANTS.items() if x.stage in VERSION_STAGES]
            raise _fail(source, f"version {name!r}: variant {variant!r} is not an image model of the chain; "
                                f"allowed: {allowed}")
        extra = sorted({"classes", "seed", "args"} & set(entry))
        if extra:
            raise _fail(source, f"version {name!r} is the chain's {variant} model, trained by the chain: {extra} "
                                "do not apply (give the version a stage to train it for the plan)")
    elif stage not in VERSION_STAGES:
        raise _fail(source, f"version {name!r}: stage {stage!r}; allowed: {list(VERSION_STAGES)}")
    classes = entry.get("classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise _fail(source, f"version {name!r}: classes={classes!r} must be a count >= 1 (the first N classes)")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 100:
        raise _fail(source, f"version {name!r}: seed={seed!r} must be an integer in [0, 100)")
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise _fail(source, f"version {name!r}: args must be a list of fct-fit options, got {args!r}")
    return Version(name, variant, stage, classes, seed, tuple(str(a) for a in args))


def parse_plan(data: Any, source: str = "<plan>") -> Plan:
    """A :class:`Plan` from the parsed YAML, every mistake named."""
    if not isinstance(data, dict):
        raise _fail(source, "must be a mapping with a 'versions' list")
    unknown = sorted(set(data) - {"versions", "transformation", "direct"})
    if unknown:
        raise _fail(source, f"unknown keys {unknown}; allowed: versions, transformation, direct")
    entries = data.get("versions")
    if not isinstance(entries, list) or len(entries) < 2:
        raise _fail(source, "'versions' must list at least two versions, oldest first")
    versions = tuple(_version(e, source, i) for i, e in enumerate(entries))
    names = [v.name for v in versions]
    if len(set(names)) != len(names):
        raise _fail(source, f"version names must differ, got {names}")
    if any("/" in n or n.startswith(".") for n in names):
        raise _fail(source, f"version names are folder names: no '/' or leading '.', got {names}")
    transformation = data.get("transformation", "transformation")
    if transformation not in chain.VARIANTS:
        raise _fail(source, f"transformation {transformation!r} is not a registered variant; known: "
                            f"{list(chain.VARIANTS)}")
    variant = chain.get(transformation)
    gallery = [s for s in variant.spaces if s.embed == "gallery"]
    if not {"old", "new"} <= set(variant.upstream) or not set(variant.upstream) <= H_ROLES or not gallery:
        usable = [n for n, v in chain.VARIANTS.items() if {"old", "new"} <= set(v.upstream) <= H_ROLES
                  and any(s.embed == "gallery" for s in v.spaces)]
        raise _fail(source, f"transformation {transformation!r} does not map an old gallery to a new model; "
                            f"choose one of {usable}")
    direct = data.get("direct", True)
    if not isinstance(direct, bool):
        raise _fail(source, f"direct={direct!r} must be true or false")
    return Plan(versions, transformation, direct, source)


def load_plan(dataset: str, path: str | Path | None = None) -> Plan:
    """The plan in ``path``, or the dataset's packaged ``configs/<dataset>/versions.yaml``."""
    path = Path(path) if path is not None else CONFIG_DIR / dataset / PLAN_FILE
    if not path.is_file():
        shipped = sorted(p.parent.name for p in CONFIG_DIR.glob(f"*/{PLAN_FILE}"))
        raise FileNotFoundError(f"no version plan {path}: write one (see configs/digits/{PLAN_FILE}) and pass "
                                f"--plan FILE; datasets with a packaged plan: {shipped}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _fail(str(path), f"is not valid YAML ({err})") from err
    return parse_plan(data, str(path))


def versions_dir(artifacts: str | Path, dataset: str) -> Path:
    """``<artifacts>/<dataset>/versions``: the plan's runs and its results."""
    return Path(artifacts) / dataset / "versions"


def _chain_step(name: str, dataset: str, artifacts: Path, seed: int, recipe: Path | None,
                common: Sequence[str]) -> Step:
    """A model of the FCT chain itself, trained exactly as ``make <dataset>-<name>`` trains it."""
    variant = chain.get(name)
    argv = ["--stage", name, "--dataset", dataset, "--artifacts", str(artifacts), "--seed", str(seed),
            *_recipe(recipe, variant.stage), *common, "--resume", "auto"]
    upstream = tuple(stage_dir(artifacts, dataset, u) / "best.ckpt" for u in variant.upstream)
    return Step(name, tuple(argv), stage_dir(artifacts, dataset, name), upstream)


def _recipe(recipe: Path | None, stage: str) -> list[str]:
    if recipe is None:
        return []
    path = recipe / f"{stage}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--recipe {recipe} has no {stage}.yaml; a recipe folder holds one file per stage")
    return ["--config", str(path)]


def plan_steps(plan: Plan, dataset: str, artifacts: str | Path, seed: int = 0, recipe: str | Path | None = None,
               common: Sequence[str] = ()) -> tuple[list[Step], dict[str, Path], dict[tuple[int, int], Path]]:
    """The fct-fit runs of ``plan``, upstream first, and where each version's and update's checkpoint will be.

    Args:
        plan: The versions.
        dataset: The dataset every model is trained on.
        artifacts: The chain's artifacts root (``make``'s ``ARTIFACTS``, or ``.../seedN``).
        seed: The run's seed (fct-fit ``--seed``); a plan-trained version gets ``100 * seed + version.seed``.
        recipe: A recipe folder (one ``<stage>.yaml`` per stage) given to every run, as ``make RECIPE=...`` does.
        common: More fct-fit options for every run (trainer presets, ``--data.root``, ``--trainer.devices``).

    Returns:
        ``(steps, {version name: checkpoint}, {(i, j): checkpoint of h from version i to version j})``.
    """
    artifacts, root = Path(artifacts), versions_dir(artifacts, dataset)
    recipe = Path(recipe) if recipe is not None else None
    steps: list[Step] = []
    chain_done: set[str] = set()

    def need_chain(name: str) -> None:
        for u in chain.get(name).upstream:
            need_chain(u)
        if name not in chain_done:
            chain_done.add(name)
            steps.append(_chain_step(name, dataset, artifacts, seed, recipe, common))

    version_ckpt: dict[str, Path] = {}
    for v in plan.versions:
        if v.variant is not None:
            need_chain(v.variant)
            version_ckpt[v.name] = stage_dir(artifacts, dataset, v.variant) / "best.ckpt"
            continue
        run_root = root / v.name
        argv = ["--stage", v.stage, "--dataset", dataset, "--artifacts", str(run_root),
                "--seed", str(100 * seed + v.seed), *_recipe(recipe, v.stage), *common,
                *(["--data.train_classes", str(v.classes)] if v.classes is not None else []), *v.args,
                "--resume", "auto"]
        step = Step(v.name, tuple(argv), stage_dir(run_root, dataset, v.stage))
        steps.append(step)
        version_ckpt[v.name] = step.checkpoint
    side: list[str] = []
    if plan.uses_side_info:
        need_chain("side_info")
        side = ["--model.side_info_checkpoint", str(stage_dir(artifacts, dataset, "side_info") / "best.ckpt")]
    h = chain.get(plan.transformation)
    h_ckpt: dict[tuple[int, int], Path] = {}
    for i, j in plan.updates:
        a, b = plan.versions[i], plan.versions[j]
        if a.variant == "old" and b.variant == "new":  # the chain's own update: its transformation variant
            need_chain(plan.transformation)
            h_ckpt[(i, j)] = stage_dir(artifacts, dataset, plan.transformation) / "best.ckpt"
            continue
        name, run_root = f"{a.name}-{b.name}", root / f"{a.name}-{b.name}"
        old, new = version_ckpt[a.name], version_ckpt[b.name]
        argv = ["--stage", plan.transformation, "--dataset", dataset, "--artifacts", str(run_root),
                "--seed", str(seed), *_recipe(recipe, h.stage), *common, "--model.old_checkpoint", str(old),
                "--model.new_checkpoint", str(new), *side, "--resume", "auto"]
        upstream = (old, new, *((Path(side[1]),) if side else ()))
        step = Step(name, tuple(argv), stage_dir(run_root, dataset, plan.transformation), upstream)
        steps.append(step)
        h_ckpt[(i, j)] = step.checkpoint
    return steps, version_ckpt, h_ckpt


def pending(step: Step) -> bool:
    """Whether ``step`` still has to run: no ``done.json``, or one older than a checkpoint it is trained from
    (fct-fit's own ``--resume auto`` decision, made here without starting a process)."""
    if not (step.out / DONE_FILE).is_file():
        return True
    return start_mode(step.out, list(step.upstream))[0] != "skip"


def run_steps(steps: Sequence[Step], runner: Callable[[Sequence[str]], int | None],
              log: Callable[[str], None] = print) -> list[str]:
    """Run every pending step in order with ``runner`` (fct-fit's arguments -> exit status; fct-versions runs each
    as its own process); returns the names run. A failed run stops the plan (finished runs are kept: the same
    command goes on from there)."""
    ran = []
    for step in steps:
        if not pending(step):
            continue
        log(f"fct-versions: training {step.name}: fct-fit {' '.join(step.argv)}")
        status = runner(step.argv)
        if status:
            raise SystemExit(f"fct-versions: training {step.name} failed (fct-fit exit status {status}; its messages "
                             "are above). Fix that and run the same command again: finished models are kept.")
        if not step.checkpoint.is_file():
            raise SystemExit(f"fct-versions: training {step.name} wrote no {step.checkpoint}")
        ran.append(step.name)
    return ran
