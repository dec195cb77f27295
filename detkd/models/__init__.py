"""torchvision detectors built from a typed config, and their weights."""

from detkd.models.build import (
    IMAGE_MEAN,
    IMAGE_STD,
    MIN_PAIRED_LEVELS,
    build_detector,
    check_pair,
    check_transforms,
    describe_levels,
    detector_arch,
    feature_channels,
    pair_levels,
    paired_channels,
    pyramid_levels,
    pyramid_strides,
)
from detkd.models.weights import checkpoint_state_dict, load_checked, read_weights, torchvision_state_dict

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MIN_PAIRED_LEVELS",
    "build_detector",
    "check_pair",
    "check_transforms",
    "describe_levels",
    "checkpoint_state_dict",
    "detector_arch",
    "feature_channels",
    "load_checked",
    "pair_levels",
    "paired_channels",
    "pyramid_levels",
    "pyramid_strides",
    "read_weights",
    "torchvision_state_dict",
]
