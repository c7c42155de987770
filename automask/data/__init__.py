"""From a DataFrame of image and mask paths to model-space batches, and back.

``validate_frame`` checks the data and returns a ``DataSpec``; ``SegmentationDataset``
and ``SegmentationDataModule`` turn it into SAM-ready batches; ``restore`` maps
predictions back to each image's original size.
"""
from .cache import SampleCache
from .datamodule import (
    EpochSampler,
    SegmentationDataModule,
    ShardSampler,
    default_num_workers,
    make_predict_loader,
    split_spec,
)
from .dataset import SegmentationDataset
from .io import image_size, read_image, read_mask, read_stack
from .transforms import (
    IGNORE_INDEX,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentConfig,
    Geometry,
    geometry_for,
    restore,
    restore_batch,
)
from .validation import DataSpec, validate_frame

__all__ = [
    "IGNORE_INDEX",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "AugmentConfig",
    "DataSpec",
    "EpochSampler",
    "Geometry",
    "SampleCache",
    "SegmentationDataModule",
    "SegmentationDataset",
    "ShardSampler",
    "default_num_workers",
    "geometry_for",
    "image_size",
    "make_predict_loader",
    "read_image",
    "read_mask",
    "read_stack",
    "restore",
    "restore_batch",
    "split_spec",
    "validate_frame",
]
