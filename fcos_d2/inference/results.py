"""Detections as data: COCO's results format, loadable by ``pycocotools.COCO.loadRes``."""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

from detectron2.data import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances

from ..utils import atomic_write


class CocoResults:
    """Collects detections of images (or video frames) as COCO results: ``image_id``,
    ``category_id`` in the dataset's own ids, ``bbox`` as absolute XYWH, ``score``, plus
    ``file_name`` (and ``frame`` for videos). Written once, atomically, by :meth:`write`."""

    def __init__(self, metadata: Optional[Metadata] = None):
        mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None) if metadata else None
        # COCOEvaluator's inverse map: contiguous class index -> the dataset's category id.
        self._category_id = {v: k for k, v in mapping.items()} if mapping else None
        self.records: list[dict[str, Any]] = []

    def add(self, instances: Instances, image_id: int, **extra: Any) -> None:
        """Detections (on the CPU, in original-image pixels) of one image."""
        for record in instances_to_coco_json(instances, image_id):
            if self._category_id is not None:
                record["category_id"] = self._category_id[record["category_id"]]
            record.update(extra)
            self.records.append(record)

    def write(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.records).encode("utf-8"), durable=False)


def unique_names(paths: Iterable[Path], suffix: str = ".png") -> list[str]:
    """An output file name per input: its stem, with ``_2``, ``_3``... where stems repeat
    (``img.jpg`` and ``img.png``, or the same name in two folders), so no output overwrites
    another."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem, count = Path(path).stem, 1
        name = f"{stem}{suffix}"
        while name in used:
            count += 1
            name = f"{stem}_{count}{suffix}"
        used.add(name)
        names.append(name)
    return names
