"""From a DataFrame of image and mask paths to model-space batches, and back.

``validate_frame`` checks the data and returns a ``DataSpec``; ``SegmentationDataset``
and ``SegmentationDataModule`` turn it into SAM-ready batches; ``restore`` maps
predictions back to each image's original size.

``SegmentationDataModule`` and ``split_spec`` load on first use: their module imports
Lightning, which prediction does not need.
"""
from .._lazy import lazy_names

from .cache import SampleCache
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
from .loaders import EpochSampler, ShardSampler, default_num_workers, make_predict_loader
from .validation import DataSpec, validate_frame

_SOURCES = {  # loaded on first use -> the submodule that defines it (imports Lightning)
    "SegmentationDataModule": "datamodule",
    "split_spec": "datamodule",
}


__getattr__ = lazy_names(__name__, _SOURCES)

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
