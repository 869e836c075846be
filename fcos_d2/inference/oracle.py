"""The oracle center-ness experiment (arXiv version, Sec. 4.1.2): detections scored with each
location's ground-truth center-ness instead of the predicted one, an upper bound on what a perfect
center-ness branch would give.

The detector itself never sees annotations at inference: :class:`OracleQualityFCOS` wraps it and
passes the oracle maps to :meth:`FCOSCore.inference` explicitly, on inputs from a loader that keeps
the annotations (:func:`build_annotated_test_loader`, or :func:`annotated_loader_config` for
LazyConfig). ``MODEL.FCOS.INFERENCE_QUALITY: oracle`` (``model.core.inference_quality`` in
LazyConfig) makes the training scripts evaluate the model through this wrapper, with Detectron2's
own evaluation loop.
"""

import copy
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_test_loader, detection_utils
from detectron2.structures import Instances
from torch import Tensor, nn

from ..modeling.box_ops import centerness_from_ltrb
from ..modeling.core import FCOSCore
from ..modeling.fcos import FCOS
from ..utils import unwrap_model


def uses_oracle_quality(model: nn.Module) -> bool:
    """Whether ``model`` (possibly in DDP) is an FCOS detector set to score with the oracle."""
    model = unwrap_model(model)
    return isinstance(model, FCOS) and model.core.inference_quality == "oracle"


def build_annotated_test_loader(cfg: CfgNode, dataset_name: str):
    """Detectron2's test loader (test-time resize, batch 1, in order) that keeps the annotations,
    resized with the image."""
    mapper = DatasetMapper(
        is_train=True,  # the only mode in which DatasetMapper keeps (and resizes) annotations
        augmentations=detection_utils.build_augmentation(cfg, is_train=False),
        image_format=cfg.INPUT.FORMAT,
    )
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


def annotated_loader_config(test_loader):
    """A copy of a LazyConfig ``dataloader.test`` (Detectron2's ``DatasetMapper``) whose mapper
    keeps the annotations, as :func:`build_annotated_test_loader` does for yacs configs."""
    annotated = copy.deepcopy(test_loader)
    annotated.mapper.is_train = True
    return annotated


def oracle_quality(
    core: FCOSCore, features: Sequence[Tensor], gt_instances: list[Instances]
) -> list[Tensor]:
    """Per level (N, HW_i): eq. (3) center-ness of each location's assigned box, 0 on background."""
    targets = core.targets(features, gt_instances)
    # Background targets are all 0: their 0/0 center-ness becomes 0.
    oracle = torch.nan_to_num(centerness_from_ltrb(targets.reg_targets), nan=0.0)
    return list(oracle.split([f.shape[-2] * f.shape[-1] for f in features], dim=1))


class OracleQualityFCOS(nn.Module):
    """Wraps a trained :class:`FCOS`: same inputs and outputs, ground-truth center-ness scores.

    Inputs need ``instances`` at network input scale, as :func:`build_annotated_test_loader` gives.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = unwrap_model(detector)

    def forward(self, batched_inputs: list[dict]) -> list[dict[str, Instances]]:
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "oracle center-ness needs annotated inputs: use build_annotated_test_loader"
            )
        detector = self.detector
        images, features, predictions = detector.dense_predictions(batched_inputs)
        gt_instances = [x["instances"].to(detector.device) for x in batched_inputs]
        quality = oracle_quality(detector.core, features, gt_instances)
        results = detector.core.inference(
            features, predictions, images.image_sizes, quality=quality
        )
        return detector.output_dicts(results, batched_inputs, images.image_sizes)
