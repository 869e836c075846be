"""A trained detector put to use: a predictor for images and files, test-time augmentation, sliced
inference for large images, and the oracle center-ness wrapper for evaluation. Each wraps the
model; none trains."""

from .oracle import OracleQualityFCOS, build_annotated_test_loader, uses_oracle_quality
from .predictor import FCOSPredictor
from .slicing import FCOSWithSlicing, build_slicing_model
from .tta import FCOSWithTTA, build_tta_model

__all__ = [
    "FCOSPredictor",
    "FCOSWithSlicing",
    "FCOSWithTTA",
    "OracleQualityFCOS",
    "build_annotated_test_loader",
    "build_slicing_model",
    "build_tta_model",
    "uses_oracle_quality",
]
