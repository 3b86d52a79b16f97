"""One LightningModule per stage; ``STAGE_CLASSES`` maps a checkpoint's stage name to its class.

Which stages and variants make up the chain (folders, options, cases) is :mod:`fct_lightning.chain`'s business.
"""

from fct_lightning.stages.base import STAGE_CLASSES, RetrievalStage
from fct_lightning.stages.bct import BCTModel
from fct_lightning.stages.closed_form import ClosedFormModel
from fct_lightning.stages.embedding import EmbeddingModel, NewModel, OldModel
from fct_lightning.stages.loading import load_h, load_stage
from fct_lightning.stages.orthogonal import OrthogonalModel
from fct_lightning.stages.side_info import SideInfoModel
from fct_lightning.stages.transformation import TransformationModel

__all__ = [
    "STAGE_CLASSES", "BCTModel", "ClosedFormModel", "EmbeddingModel", "NewModel", "OldModel", "OrthogonalModel",
    "RetrievalStage", "SideInfoModel", "TransformationModel", "load_h", "load_stage",
]
