"""Datasets and augmentation: everything between files on disk and normalised batches.

``load_dataset(name)`` returns a :class:`Dataset` of uint8 arrays; ``batches(...)`` turns
arrays into augmented, normalised float tensors. See ``datasets.py`` for where files are
looked up and ``transforms.py`` for the augmentations.
"""

from edgesqueeze.data.datasets import (
    CIFAR10_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN_DATASETS,
    Dataset,
    calibration_indices,
    channel_stats,
    data_search_path,
    dataset_file,
    fit_channels,
    load_dataset,
    read_idx,
    split_train_val,
    with_channels,
)
from edgesqueeze.data.download import fetch
from edgesqueeze.data.transforms import (
    AugmentConfig,
    apply_augment,
    batches,
    default_augment,
    random_affine,
    random_crop,
    random_hflip,
)

__all__ = [
    "Dataset", "load_dataset", "split_train_val", "calibration_indices", "data_search_path", "channel_stats", "read_idx",
    "dataset_file", "fit_channels", "with_channels",
    "KNOWN_DATASETS", "CIFAR10_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD",
    "AugmentConfig", "default_augment", "apply_augment", "random_crop", "random_hflip", "random_affine",
    "batches", "fetch",
]
