"""torchvision detectors built from a typed config, and their weights."""

from detkd.models.build import (
    IMAGE_MEAN,
    IMAGE_STD,
    build_detector,
    check_pair,
    check_transforms,
    detector_arch,
    feature_channels,
    pyramid_levels,
)
from detkd.models.weights import checkpoint_state_dict, load_checked, read_weights, torchvision_state_dict

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "build_detector",
    "check_pair",
    "check_transforms",
    "checkpoint_state_dict",
    "detector_arch",
    "feature_channels",
    "load_checked",
    "pyramid_levels",
    "read_weights",
    "torchvision_state_dict",
]
