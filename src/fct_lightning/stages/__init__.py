"""One LightningModule per stage; ``STAGES`` maps the ``--stage`` name to its class."""

from fct_lightning.stages.base import RetrievalStage
from fct_lightning.stages.bct import BCTModel
from fct_lightning.stages.embedding import EmbeddingModel, NewModel, OldModel
from fct_lightning.stages.side_info import SideInfoModel
from fct_lightning.stages.transformation import TransformationModel

STAGES: dict[str, type[RetrievalStage]] = {
    "old": OldModel,
    "side_info": SideInfoModel,
    "new": NewModel,
    "transformation": TransformationModel,
    "bct": BCTModel,
}


def get_stage_class(name: str) -> type[RetrievalStage]:
    """The LightningModule class of stage ``name``; a clear error for unknown names."""
    if name not in STAGES:
        raise ValueError(f"stage={name!r} is not known; choose one of {sorted(STAGES)}.")
    return STAGES[name]


__all__ = [
    "STAGES", "BCTModel", "EmbeddingModel", "NewModel", "OldModel", "RetrievalStage", "SideInfoModel",
    "TransformationModel", "get_stage_class",
]
