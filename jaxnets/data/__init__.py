"""Data: MNIST-format sources as numpy arrays, the cache, epoch order, on-device augmentation."""

from jaxnets.data import augment
from jaxnets.data.augment import (
    AugmentConfig,
    TransformParams,
    apply_transform,
    fit_featurewise_stats,
    random_transform,
    sample_transform_params,
    standardize,
)
from jaxnets.data.batching import epoch_permutation, normalize, split_validation
from jaxnets.data.cache import default_cache_dir
from jaxnets.data.dataset import HOW_TO_GET_DATA, Dataset, DatasetInfo, check_labels
from jaxnets.data.idx import read_idx, write_idx
from jaxnets.data.sources import load


def __getattr__(name):
    # TFDS is imported lazily: loading the sample or an IDX directory does not pay for it.
    if name in ("DataUnavailableError", "host_reachable"):
        from jaxnets.data import tfds_source

        return getattr(tfds_source, name)
    raise AttributeError(f"module 'jaxnets.data' has no attribute {name!r}")


__all__ = [
    "HOW_TO_GET_DATA",
    "AugmentConfig",
    "DataUnavailableError",
    "Dataset",
    "DatasetInfo",
    "TransformParams",
    "apply_transform",
    "augment",
    "check_labels",
    "default_cache_dir",
    "epoch_permutation",
    "fit_featurewise_stats",
    "host_reachable",
    "load",
    "normalize",
    "random_transform",
    "read_idx",
    "sample_transform_params",
    "split_validation",
    "standardize",
    "write_idx",
]
