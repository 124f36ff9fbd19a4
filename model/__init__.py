from .alignment import OBJECTIVES, AlignmentObjective, AttentionView, build_objectives, register_objective
from .iais import IaisVariant
from .itm import (FastPaths, UniterForImageTextRetrieval, UniterForImageTextRetrievalHardNeg,
                  scoring_mode)
from .model import (CheckpointMismatchError, UniterConfig, UniterEncoder, UniterModel,
                    UniterPreTrainedModel)
# alignment objectives register when their module is imported: one line for each
from . import iais  # noqa: E402,F401  'iais-singular', 'iais-distributed'

IMG_DIM = 2048  # BUTD Faster R-CNN region features

__all__ = ["AlignmentObjective", "AttentionView", "CheckpointMismatchError", "FastPaths", "IMG_DIM", "IaisVariant",
           "OBJECTIVES", "UniterConfig", "UniterEncoder", "UniterModel", "UniterPreTrainedModel",
           "UniterForImageTextRetrieval", "UniterForImageTextRetrievalHardNeg", "build_objectives",
           "register_objective", "scoring_mode"]
