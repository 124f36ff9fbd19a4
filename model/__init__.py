from .itm import UniterForImageTextRetrieval, UniterForImageTextRetrievalHardNeg
from .model import (CheckpointMismatchError, UniterConfig, UniterEncoder, UniterModel,
                    UniterPreTrainedModel)

IMG_DIM = 2048  # BUTD Faster R-CNN region features

__all__ = ["CheckpointMismatchError", "IMG_DIM", "UniterConfig", "UniterEncoder", "UniterModel",
           "UniterPreTrainedModel", "UniterForImageTextRetrieval",
           "UniterForImageTextRetrievalHardNeg"]
