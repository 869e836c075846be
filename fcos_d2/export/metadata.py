"""What a user of an exported file needs beside the graph, stored in the file itself: the class
names (to draw and to report) and the test-time resize and input format (to prepare images as
the model was tested). :func:`~fcos_d2.export.model.export_model` writes them (ONNX:
``metadata_props``, which onnxruntime gives as ``session.get_modelmeta().custom_metadata_map``;
TorchScript: the extra file ``fcos_d2_metadata.json``) and
:func:`~fcos_d2.export.model.read_metadata` reads them. Every value is a string; ``class_names``
is a JSON list whose index is the ``classes`` output."""

import json
import logging

from detectron2.data import MetadataCatalog

from ..data.builtin import register_datasets_from_config
from ..data.user_datasets import DatasetConfigError

logger = logging.getLogger(__name__)


def class_names(cfg) -> list[str]:
    """``thing_classes`` of the first dataset of ``DATASETS.TEST``, then ``DATASETS.TRAIN``, that
    has one name per class of ``MODEL.FCOS.NUM_CLASSES``; else "0", "1", ... with a warning.

    Registers the config's datasets first (``DATASETS.*`` keys); a dataset that cannot be read on
    this machine (e.g. a deployment machine without the training data) is no reason to refuse
    the export: its names are then the numbers, and the warning says why."""
    num_classes = cfg.MODEL.FCOS.NUM_CLASSES
    why = f"no dataset of DATASETS.TEST or DATASETS.TRAIN names {num_classes} classes"
    try:
        register_datasets_from_config(cfg)
    except DatasetConfigError as error:
        why = f"the config's datasets could not be read ({error})"
    for name in (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN):
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
    logger.warning("The exported file names its classes by number: %s", why)
    return [str(i) for i in range(num_classes)]


def export_metadata(cfg) -> dict[str, str]:
    """The metadata written into every exported file of the model of ``cfg``."""
    return {
        "class_names": json.dumps(class_names(cfg)),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
    }
