"""Training: the LightningModule, its optimiser and schedule, the fit callbacks, the
Trainer recipe of a candidate, its record, the resumable state of a fit and the image
embeddings kept while the encoder is frozen."""
from .callbacks import BestTrainableWeights, EpochCheckpoint
from .module import NonFiniteLossError, SegmentationModule
from .optim import build_optimizer, lr_lambda
from .record import CandidateRecord

__all__ = ["BestTrainableWeights", "CandidateRecord", "EpochCheckpoint", "NonFiniteLossError",
           "SegmentationModule", "build_optimizer", "lr_lambda"]
