from .iais import IaisVariant
from .itm import (FastPaths, UniterForImageTextRetrieval, UniterForImageTextRetrievalHardNeg,
                  scoring_mode)
from .model import (CheckpointMismatchError, UniterConfig, UniterEncoder, UniterModel,
                    UniterPreTrainedModel)

IMG_DIM = 2048  # BUTD Faster R-CNN region features

__all__ = ["CheckpointMismatchError", "FastPaths", "IMG_DIM", "IaisVariant", "UniterConfig",
           "UniterEncoder", "UniterModel", "UniterPreTrainedModel", "UniterForImageTextRetrieval",
           "UniterForImageTextRetrievalHardNeg", "scoring_mode"]
