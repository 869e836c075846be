"""Your own datasets from the config: ``DATASETS.COCO_JSON`` and ``DATASETS.VOC_DIR``.

Each entry is registered through Detectron2's own ``register_coco_instances`` /
``register_pascal_voc`` after checks that turn the usual slips (a wrong path, a json of another
format, annotations of images that are not on disk, a name used twice) into errors that name the
entry, the file and the problem, before anything is built.
"""

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from ..checks import ConfigError

logger = logging.getLogger(__name__)

COCO_KEYS = ("images", "annotations", "categories")
# Metadata key: how many images have a non-crowd annotation (counted while checking the files).
ANNOTATED_IMAGES = "fcos_d2_annotated_images"
MAX_NAMED = 5  # how many offending files or ids an error lists


class DatasetConfigError(ConfigError):
    """A ``DATASETS.*`` entry that cannot be registered or loaded as it is."""


def _listed(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _entries(cfg: CfgNode, key: str) -> list[tuple[str, str, str]]:
    entries = []
    for index, entry in enumerate(cfg.DATASETS[key]):
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise DatasetConfigError(
                f"DATASETS.{key}[{index}] must be a triple of non-empty strings "
                f"{_ENTRY_FORMATS[key]}, got {entry!r}"
            )
        entries.append(tuple(entry))
    return entries


_ENTRY_FORMATS = {
    "COCO_JSON": "(name, json file, image folder)",
    "VOC_DIR": "(name, VOC directory, split)",
}


def _already_registered(name: str, key: str, **expected: str) -> bool:
    """True if ``name`` is registered with exactly ``expected`` metadata (re-registering the
    same entry is a no-op); an error if it names something else."""
    if name not in DatasetCatalog.list():
        return False
    metadata = MetadataCatalog.get(name)
    if all(metadata.get(k, None) == v for k, v in expected.items()):
        return True
    raise DatasetConfigError(
        f"DATASETS.{key}: the dataset name {name!r} is already registered "
        f"(json_file={metadata.get('json_file', None)!r}, "
        f"dirname={metadata.get('dirname', None)!r}); "
        "choose another name"
    )


def read_coco_json(name: str, json_file: Path, image_root: Path) -> dict:
    """The parsed json, checked: top-level keys, annotation image ids, image files on disk."""
    where = f"DATASETS.COCO_JSON entry {name!r}"
    if not json_file.is_file():
        raise DatasetConfigError(f"{where}: annotation file {json_file} does not exist")
    if not image_root.is_dir():
        raise DatasetConfigError(f"{where}: image folder {image_root} does not exist")
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetConfigError(f"{where}: {json_file} is not valid json: {error}") from None
    missing_keys = [k for k in COCO_KEYS if not isinstance(data, dict) or k not in data]
    if missing_keys:
        raise DatasetConfigError(
            f"{where}: {json_file} is not a COCO detection json: it lacks {missing_keys} "
            f"(a COCO json has the lists {list(COCO_KEYS)})"
        )
    image_ids = {image.get("id") for image in data["images"]}
    orphans = sorted({a.get("image_id") for a in data["annotations"]} - image_ids, key=str)
    if orphans:
        raise DatasetConfigError(
            f"{where}: {json_file} has annotations of image ids not in its 'images': "
            f"{_listed(orphans)}"
        )
    absent = [i["file_name"] for i in data["images"] if not (image_root / i["file_name"]).is_file()]
    if absent:
        raise DatasetConfigError(
            f"{where}: {len(absent)} of {len(data['images'])} images listed in {json_file} are "
            f"not in {image_root}: {_listed(absent)}"
        )
    return data


def register_coco_entry(name: str, json_file: str, image_root: str) -> None:
    """Register one ``DATASETS.COCO_JSON`` entry; paths are relative to the working directory."""
    json_path, root = Path(json_file).resolve(), Path(image_root).resolve()
    if _already_registered(name, "COCO_JSON", json_file=str(json_path), image_root=str(root)):
        return
    data = read_coco_json(name, json_path, root)
    # Detectron2 maps category ids in increasing order to contiguous classes 0..C-1.
    categories = sorted(data["categories"], key=lambda c: c["id"])
    thing_classes = [c["name"] for c in categories]
    annotated = len({a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)})
    metadata = {"thing_classes": thing_classes, ANNOTATED_IMAGES: annotated}
    register_coco_instances(name, metadata, str(json_path), str(root))
    logger.info(
        "Registered %s: %d images, classes %s, from %s",
        name,
        len(data["images"]),
        thing_classes,
        json_path,
    )


def _voc_ids(name: str, dirname: Path, split: str) -> list[str]:
    where = f"DATASETS.VOC_DIR entry {name!r}"
    if not dirname.is_dir():
        raise DatasetConfigError(f"{where}: VOC directory {dirname} does not exist")
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetConfigError(f"{where}: split file {split_file} does not exist")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if len(ids) < 2:
        # Detectron2's load_voc_instances reads the split with np.loadtxt, which cannot iterate
        # over a single id.
        raise DatasetConfigError(f"{where}: {split_file} must list at least 2 image ids, got {ids}")
    for folder, suffix in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
        absent = [i + suffix for i in ids if not (dirname / folder / f"{i}{suffix}").is_file()]
        if absent:
            raise DatasetConfigError(
                f"{where}: {len(absent)} of the {len(ids)} ids in {split_file} have no file in "
                f"{dirname / folder}: {_listed(absent)}"
            )
    return ids


def _voc_object_names(dirname: Path, ids: Sequence[str]) -> tuple[dict[str, str], int]:
    """Class name -> the first annotation file that uses it; the number of annotated images."""
    names: dict[str, str] = {}
    annotated = 0
    for image_id in ids:
        xml_file = dirname / "Annotations" / f"{image_id}.xml"
        try:
            objects = ET.parse(xml_file).findall("object")
        except ET.ParseError as error:
            raise DatasetConfigError(
                f"DATASETS.VOC_DIR: {xml_file} is not valid XML: {error}"
            ) from None
        annotated += bool(objects)
        for obj in objects:
            names.setdefault((obj.findtext("name") or "").strip(), str(xml_file))
    return names, annotated


def register_voc_entries(entries: Sequence[tuple[str, str, str]], classes: Sequence[str]) -> None:
    """Register ``DATASETS.VOC_DIR`` entries, all with one class list: ``DATASETS.VOC_CLASSES``
    or, when empty, the sorted names found in all their annotations (so train and val agree)."""
    if not entries:
        return
    resolved = [(name, Path(d).resolve(), split) for name, d, split in entries]
    ids = {name: _voc_ids(name, dirname, split) for name, dirname, split in resolved}
    used: dict[str, str] = {}
    annotated: dict[str, int] = {}
    for name, dirname, _ in resolved:
        names, annotated[name] = _voc_object_names(dirname, ids[name])
        for cls, xml_file in names.items():
            used.setdefault(cls, xml_file)
    class_names = list(classes) or sorted(used)
    unknown = sorted(set(used) - set(class_names))
    if unknown:
        raise DatasetConfigError(
            f"DATASETS.VOC_CLASSES={list(class_names)} lacks the classes {unknown} used in the "
            f"annotations (e.g. {used[unknown[0]]})"
        )
    if not class_names:
        raise DatasetConfigError(
            "DATASETS.VOC_DIR: the annotations name no objects and VOC_CLASSES is empty"
        )
    for name, dirname, split in resolved:
        if _already_registered(name, "VOC_DIR", dirname=str(dirname), split=split):
            continue
        # ``year`` only selects the metric of Detectron2's VOC evaluator; we use COCOEvaluator.
        register_pascal_voc(name, str(dirname), split, 2012, class_names)
        MetadataCatalog.get(name).set(**{ANNOTATED_IMAGES: annotated[name]})
        logger.info(
            "Registered %s: %d images, classes %s, from %s",
            name,
            len(ids[name]),
            class_names,
            dirname,
        )


def register_user_datasets(cfg: CfgNode) -> None:
    """Register every ``DATASETS.COCO_JSON`` and ``DATASETS.VOC_DIR`` entry of ``cfg``."""
    coco, voc = _entries(cfg, "COCO_JSON"), _entries(cfg, "VOC_DIR")
    names = [e[0] for e in coco + voc]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetConfigError(
            f"DATASETS.COCO_JSON / VOC_DIR name the datasets {repeated} more than once"
        )
    for entry in coco:
        register_coco_entry(*entry)
    register_voc_entries(voc, cfg.DATASETS.VOC_CLASSES)


def check_training_data(cfg: CfgNode) -> None:
    """Every ``DATASETS.TRAIN`` set registered from the config must keep images after Detectron2's
    filtering of images without (non-crowd) annotations; the data loader would otherwise stop with
    a bare assertion deep inside."""
    if not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        return
    for name in cfg.DATASETS.TRAIN:
        metadata = MetadataCatalog.get(name)
        if metadata.get(ANNOTATED_IMAGES, None) == 0:
            source = metadata.get("json_file", None) or metadata.get("dirname", None)
            raise DatasetConfigError(
                f"training dataset {name!r} ({source}) has no image with a (non-crowd) annotation, "
                "so nothing is left to train on after DATALOADER.FILTER_EMPTY_ANNOTATIONS"
            )
