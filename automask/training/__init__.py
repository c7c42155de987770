"""Training: the LightningModule, its optimiser and schedule, and the fit callbacks."""
from .callbacks import BestTrainableWeights
from .module import SegmentationModule
from .optim import build_optimizer, lr_lambda

__all__ = ["BestTrainableWeights", "SegmentationModule", "build_optimizer", "lr_lambda"]
