"""The oracle center-ness experiment (arXiv version, Sec. 4.1.2): detections scored with each
location's ground-truth center-ness instead of the predicted one, an upper bound on what a perfect
center-ness branch would give.

The detector itself never sees annotations at inference; this module passes the oracle maps to
:meth:`FCOSCore.inference` explicitly. ``MODEL.FCOS.INFERENCE_QUALITY: oracle`` with
``train_net.py --eval-only`` evaluates through :func:`test_with_oracle_quality`.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_test_loader, detection_utils
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.structures import Instances
from torch import Tensor, nn

from ..modeling.box_ops import centerness_from_ltrb
from ..modeling.core import FCOSCore
from ..modeling.fcos import FCOS

logger = logging.getLogger(__name__)


def build_annotated_test_loader(cfg: CfgNode, dataset_name: str):
    """Detectron2's test loader (test-time resize, batch 1, in order) that keeps the annotations,
    resized with the image."""
    mapper = DatasetMapper(
        is_train=True,  # the only mode in which DatasetMapper keeps (and resizes) annotations
        augmentations=detection_utils.build_augmentation(cfg, is_train=False),
        image_format=cfg.INPUT.FORMAT,
    )
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


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

    def __init__(self, detector: FCOS):
        super().__init__()
        self.detector = detector

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


def test_with_oracle_quality(
    cfg: CfgNode, model: FCOS, build_evaluator: Callable[[str], DatasetEvaluator]
) -> "OrderedDict[str, dict]":
    """``DefaultTrainer.test`` for the oracle: every ``DATASETS.TEST`` set, annotated loader."""
    wrapped = OracleQualityFCOS(model)
    results: OrderedDict[str, dict] = OrderedDict()
    for name in cfg.DATASETS.TEST:
        results[name] = inference_on_dataset(
            wrapped, build_annotated_test_loader(cfg, name), build_evaluator(name)
        )
        logger.info("Evaluation results for %s with oracle center-ness in csv format:", name)
        print_csv_format(results[name])
    return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results
