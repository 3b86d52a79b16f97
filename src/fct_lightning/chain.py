"""The chain's vocabulary, in one place: every variant, the embedding spaces they produce and the evaluation cases.

A *variant* is one trained model of the chain: a stage (the LightningModule), the constructor options that make
it this variant, its artifacts folder, the upstream variants whose ``best.ckpt`` it needs, and the evaluation
spaces and cases it adds. ``fct-fit --stage <variant>``, ``fct-eval``, ``fct-report``, the gallery commands and the
Makefile (through ``fct-chain makefile``) all read this registry; adding a variant is one :func:`register` call::

    from fct_lightning.chain import Case, Space, Variant, register

    register(Variant("transformation_small", stage="transformation",
                     options={"use_side_info": True, "uncertainty": False, "mixer_width": 256},
                     upstream=("old", "side_info", "new"),
                     spaces=(Space("fct-small", embed="gallery"),),
                     cases=(Case("fct-small/old", "new", "fct-small", cross=True),)))

A *space* is one way to embed an image: ``query`` spaces use the variant's ``query_embed`` (the model itself),
``gallery`` spaces its ``gallery_embed`` (e.g. h(old(x), side(x))). A *case* is ``<query space>/<gallery space>``
searched leave-one-out; its name is what logs, W&B and tables show (``fct+side/old`` = new-model queries against
the transformed old gallery).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fct_lightning.stages import STAGE_CLASSES
from fct_lightning.stages.base import RetrievalStage


@dataclass(frozen=True)
class Space:
    """One way to embed an image, produced by a variant.

    Attributes:
        name: The space's name (``old``, ``fct+side``, ...), unique across the registry.
        embed: ``query`` (the variant's ``query_embed``) or ``gallery`` (its ``gallery_embed``).
    """

    name: str
    embed: str = "query"

    def __post_init__(self) -> None:
        if self.embed not in ("query", "gallery"):
            raise ValueError(f"Space {self.name!r}: embed={self.embed!r}; allowed: 'query', 'gallery'")


@dataclass(frozen=True)
class Case:
    """One evaluation case: queries embedded in ``query`` searched against a gallery embedded in ``gallery``.

    Attributes:
        name: What logs and tables call it (``<query model>/<gallery model>``).
        query: The query space.
        gallery: The gallery space.
        cross: A cross-model case, judged against ``old/old`` by the compatibility criterion in reports.
        default: Evaluated by ``fct-eval`` unless ``--cases`` says otherwise.
        order: Position in tables and reports (ties: registration order).
    """

    name: str
    query: str
    gallery: str
    cross: bool = False
    default: bool = True
    order: int = 50


@dataclass(frozen=True)
class Variant:
    """One trained model of the chain.

    Attributes:
        name: ``--stage`` value, artifacts folder and make target (``<dataset>-<name>``).
        stage: The stage (a key of :data:`~fct_lightning.stages.STAGE_CLASSES`).
        options: Model constructor arguments that make this variant, given to fct-fit as ``--model.<k> <v>``;
            a trained model belongs to the variant of its stage whose options it matches most specifically.
        upstream: Variants whose ``best.ckpt`` this one is trained from (``--model.<role>_checkpoint``).
        spaces: Evaluation spaces it produces.
        cases: Evaluation cases it adds (their spaces may come from other variants).
        seed_offset: Its seed is ``1000 * --seed + seed_offset``: independently trained models start apart.
        backfill: The gallery space whose backfilling curves it supplies (an uncertainty head is preferred).
    """

    name: str
    stage: str
    options: Mapping[str, Any] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    spaces: tuple[Space, ...] = ()
    cases: tuple[Case, ...] = ()
    seed_offset: int = 0
    backfill: str | None = None

    @property
    def stage_class(self) -> type[RetrievalStage]:
        return STAGE_CLASSES[self.stage]

    def cli_options(self) -> list[str]:
        """``--model.<key> <value>`` for each option (booleans as ``true``/``false``)."""
        out = []
        for key, value in self.options.items():
            out += [f"--model.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        return out

    def matches(self, hparams: Mapping[str, Any]) -> bool:
        return all(hparams.get(k) == v for k, v in self.options.items())


_VARIANTS: dict[str, Variant] = {}
VARIANTS: Mapping[str, Variant] = MappingProxyType(_VARIANTS)
"""Every registered variant by name, in registration order (the report's order)."""


def register(variant: Variant) -> Variant:
    """Add ``variant`` to the registry; its names must be new and its references known."""
    if variant.name in _VARIANTS:
        raise ValueError(f"a variant named {variant.name!r} is already registered; pick another name")
    if variant.stage not in STAGE_CLASSES:
        raise ValueError(f"Variant {variant.name!r}: stage={variant.stage!r} is not known; "
                         f"allowed: {sorted(STAGE_CLASSES)}")
    unknown = [u for u in variant.upstream if u not in _VARIANTS]
    if unknown:
        raise ValueError(f"Variant {variant.name!r}: upstream {unknown} are not registered (register them first)")
    taken = {s.name for s in spaces()} | {c.name for c in cases()}
    clash = [x for x in [s.name for s in variant.spaces] + [c.name for c in variant.cases] if x in taken]
    if clash:
        raise ValueError(f"Variant {variant.name!r}: spaces or cases {clash} are already registered")
    _VARIANTS[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a variant (tests register throwaway ones); variants built on it must go first."""
    users = [v.name for v in _VARIANTS.values() if name in v.upstream]
    if users:
        raise ValueError(f"variant {name!r} is upstream of {users}; unregister those first")
    _VARIANTS.pop(name, None)


def get(name: str) -> Variant:
    """The variant ``name``, with an error listing the known ones."""
    if name not in _VARIANTS:
        raise ValueError(f"--stage {name!r} is not a known stage or variant; choose one of {list(_VARIANTS)}")
    return _VARIANTS[name]


def spaces() -> list[Space]:
    return [s for v in _VARIANTS.values() for s in v.spaces]


def cases() -> list[Case]:
    """Every registered case, in report order."""
    return sorted((c for v in _VARIANTS.values() for c in v.cases), key=lambda c: c.order)


def case(name: str) -> Case:
    found = {c.name: c for c in cases()}
    if name not in found:
        raise ValueError(f"case {name!r} is not known; choose from {list(found)}")
    return found[name]


def default_cases() -> tuple[str, ...]:
    return tuple(c.name for c in cases() if c.default)


def space_source(name: str) -> tuple[Variant, Space]:
    """The variant that produces space ``name``, and the space."""
    for v in _VARIANTS.values():
        for s in v.spaces:
            if s.name == name:
                return v, s
    raise ValueError(f"space {name!r} is not produced by any registered variant; known: {[s.name for s in spaces()]}")


def backfill_sources() -> dict[str, list[Variant]]:
    """By gallery space, the variants that supply its backfilling curves, those with an uncertainty head first."""
    out: dict[str, list[Variant]] = {}
    for v in _VARIANTS.values():
        if v.backfill:
            out.setdefault(v.backfill, []).append(v)
    for space, found in out.items():
        out[space] = sorted(found, key=lambda v: not v.options.get("uncertainty", False))
    return out


def variant_of(stage: str, hparams: Mapping[str, Any]) -> Variant:
    """The variant a model of ``stage`` with constructor arguments ``hparams`` belongs to: among the variants of that
    stage whose options it matches, the one with the most options."""
    found = [v for v in _VARIANTS.values() if v.stage == stage and v.matches(hparams)]
    if not found:
        known = {v.name: dict(v.options) for v in _VARIANTS.values() if v.stage == stage}
        raise ValueError(f"a {stage} model with these options belongs to no registered variant (known: {known})")
    return max(found, key=lambda v: len(v.options))


def stages_in_order(names: Iterable[str] | None = None) -> list[str]:
    """Variant names with every upstream variant before the variants built on it."""
    want = list(_VARIANTS) if names is None else list(names)
    order: list[str] = []

    def visit(name: str) -> None:
        for u in get(name).upstream:
            visit(u)
        if name not in order:
            order.append(name)

    for name in want:
        visit(name)
    return order


# ----------------------------------------------------------------------------------------------- the FCT chain
_TRANSFORMATION = {"use_side_info": True, "uncertainty": False}
for _v in (
    Variant("old", "old", upstream=(), spaces=(Space("old"),), cases=(Case("old/old", "old", "old", order=0),),
            seed_offset=0),
    Variant("side_info", "side_info", spaces=(Space("side"),),
            cases=(Case("side/side", "side", "side", default=False, order=90),), seed_offset=1),
    Variant("new", "new", spaces=(Space("new"),),
            cases=(Case("new/new", "new", "new", order=1), Case("new/old", "new", "old", cross=True, order=2)),
            seed_offset=2),
    Variant("bct", "bct", upstream=("old",), spaces=(Space("bct"),),
            cases=(Case("bct/old", "bct", "old", cross=True, order=3), Case("bct/bct", "bct", "bct", order=4)),
            seed_offset=4),
    Variant("transformation", "transformation", dict(_TRANSFORMATION), upstream=("old", "side_info", "new"),
            spaces=(Space("fct+side", "gallery"),),
            cases=(Case("fct+side/old", "new", "fct+side", cross=True, order=6),), seed_offset=3, backfill="fct+side"),
    Variant("transformation_noside", "transformation", {**_TRANSFORMATION, "use_side_info": False},
            upstream=("old", "new"), spaces=(Space("fct", "gallery"),),
            cases=(Case("fct/old", "new", "fct", cross=True, order=5),), seed_offset=3, backfill="fct"),
    Variant("fastfill", "transformation", {**_TRANSFORMATION, "uncertainty": True},
            upstream=("old", "side_info", "new"), seed_offset=3, backfill="fct+side"),
    Variant("fastfill_noside", "transformation", {"use_side_info": False, "uncertainty": True},
            upstream=("old", "new"), seed_offset=3, backfill="fct"),
):
    register(_v)

# ----------------------------------------------------------------------------------- closed-form transformations
# h solved in one pass over the transformation's training pairs (the same feature cache), no optimiser: least squares
# with and without side-info, and orthogonal Procrustes (semi-orthogonal when the dimensions differ)
for _v in (
    Variant("linear", "closed_form", {"family": "linear", "use_side_info": True}, upstream=("old", "side_info", "new"),
            spaces=(Space("linear+side", "gallery"),),
            cases=(Case("linear+side/old", "new", "linear+side", cross=True, order=8),), seed_offset=3),
    Variant("linear_noside", "closed_form", {"family": "linear", "use_side_info": False}, upstream=("old", "new"),
            spaces=(Space("linear", "gallery"),),
            cases=(Case("linear/old", "new", "linear", cross=True, order=7),), seed_offset=3),
    Variant("procrustes", "closed_form", {"family": "procrustes", "use_side_info": False}, upstream=("old", "new"),
            spaces=(Space("procrustes", "gallery"),),
            cases=(Case("procrustes/old", "new", "procrustes", cross=True, order=9),), seed_offset=3),
):
    register(_v)

# ------------------------------------------------------------------------------ λ-orthogonality (Ricci et al., 2025)
# F (old -> new) moves the gallery to the new space (case new/F); B (new -> old), kept near orthogonal, maps new-model
# queries into the old space to search the untouched old gallery (case B/old). B is the same with and without
# side-info (only F takes it), so the side-info variant adds F+side alone. B is a query space: fct-eval applies B to the
# new model's features (the stage's query_embed, B(new(x))), the old gallery stays as the old model embedded it.
for _v in (
    Variant("orthogonal", "orthogonal", {"use_side_info": False}, upstream=("old", "new"),
            spaces=(Space("F", "gallery"), Space("B", "query")),
            cases=(Case("new/F", "new", "F", cross=True, order=10), Case("B/old", "B", "old", cross=True, order=12)),
            seed_offset=5),
    Variant("orthogonal_side", "orthogonal", {"use_side_info": True}, upstream=("old", "side_info", "new"),
            spaces=(Space("F+side", "gallery"),),
            cases=(Case("new/F+side", "new", "F+side", cross=True, order=11),), seed_offset=5),
):
    register(_v)
