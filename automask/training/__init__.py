"""Training: the LightningModule, its optimiser and schedule, the fit callbacks, the
Trainer recipe of a candidate, its record, the resumable state of a fit (its
checkpoints' small tensors packed, ``packing``) and the image embeddings kept while the
encoder is frozen.

The names below load on first use, so that importing one submodule (``record``, which a
saved predictor needs, or ``state``) does not import Lightning with the package.
"""
from .._lazy import lazy_names

_SOURCES = {  # public name -> the submodule that defines it
    "BestTrainableWeights": "callbacks",
    "EpochCheckpoint": "callbacks",
    "NonFiniteLossError": "module",
    "SegmentationModule": "module",
    "build_optimizer": "optim",
    "lr_lambda": "optim",
    "CandidateRecord": "record",
}

__all__ = sorted(_SOURCES)


__getattr__ = lazy_names(__name__, _SOURCES)
