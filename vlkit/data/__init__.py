"""Data: image transforms, the synthetic world, and readers of datasets on disk."""
from .jsonl import DatasetError, FolderDataset, JsonlDataset
from .synthetic import (COLORS, HELDOUT_COMBINATIONS, RELATIONS, SHAPES, SIZES, SyntheticStream,
                        SyntheticWorld, class_names, write_dataset)
from .transforms import (CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, ImageError,
                         ImageTransform, center_crop, hflip, load_image, normalize,
                         random_resized_crop, resize, swap_left_right, to_tensor)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "COLORS", "DatasetError", "FolderDataset", "HALF",
    "HELDOUT_COMBINATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "ImageTransform",
    "JsonlDataset", "RELATIONS", "SHAPES", "SIZES", "SyntheticStream", "SyntheticWorld",
    "center_crop", "class_names", "hflip", "load_image", "normalize", "random_resized_crop",
    "resize", "swap_left_right", "to_tensor", "write_dataset",
]
