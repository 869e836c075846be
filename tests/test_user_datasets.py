"""Your own data from config keys (DATASETS.COCO_JSON, DATASETS.VOC_DIR): end to end, bad inputs."""

import json
import subprocess
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import (
    CATEGORIES,
    QUICKSTART,
    REPO,
    SIZE,
    args_for,
    draw_records,
    run_python,
    tiny_opts,
    write_coco,
)

from fcos_d2.config import build_cfg
from fcos_d2.data.user_datasets import DatasetConfigError, register_user_datasets


def write_voc(root: Path, split: str, count: int, seed: int) -> None:
    records = draw_records(root / "JPEGImages", count, seed)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = []
    for name, objects in records:
        image_id = f"{split}_{Path(name).stem}"
        (root / "JPEGImages" / name).rename(root / "JPEGImages" / f"{image_id}.jpg")
        objs = "".join(
            f"<object><name>{CATEGORIES[c]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
            "</bndbox></object>"
            for c, (x0, y0, x1, y1) in objects
        )
        size = f"<size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size>"
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>{size}{objs}</annotation>"
        )
        ids.append(image_id)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    done = run_python(*cmd, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def opts_for(tmp_path: Path, datasets_key: str, entries: str, train: str, test: str) -> list:
    return tiny_opts(
        tmp_path,
        4,
        **{
            datasets_key: entries,
            "DATASETS.TRAIN": f"('{train}',)",
            "DATASETS.TEST": f"('{test}',)",
            "MODEL.FCOS.NUM_CLASSES": 2,
            "INPUT.MIN_SIZE_TRAIN": (SIZE,),
            "INPUT.MAX_SIZE_TRAIN": SIZE,
            "INPUT.MIN_SIZE_TEST": SIZE,
            "INPUT.MAX_SIZE_TEST": SIZE,
            "SOLVER.CHECKPOINT_PERIOD": 100,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_train_evaluate_draw_and_analyse_with_config_keys_only(tmp_path, layout):
    # The working directory holds the data, given by relative paths as a user would write them.
    data = tmp_path / "data"
    if layout == "coco":
        write_coco(data, "train", 6, seed=0)
        write_coco(data / "val", "val", 4, seed=1)
        key = "DATASETS.COCO_JSON"
        entries = (
            f"(('{layout}_mine_train', 'data/train.json', 'data/images'), "
            f"('{layout}_mine_val', 'data/val/val.json', 'data/val/images'))"
        )
    else:
        write_voc(data / "VOC", "train", 6, seed=0)
        write_voc(data / "VOC", "val", 4, seed=1)
        key = "DATASETS.VOC_DIR"
        entries = (
            f"(('{layout}_mine_train', 'data/VOC', 'train'), "
            f"('{layout}_mine_val', 'data/VOC', 'val'))"
        )
    opts = opts_for(tmp_path, key, entries, f"{layout}_mine_train", f"{layout}_mine_val")
    train = run(str(REPO / "train_net.py"), "--config-file", QUICKSTART, *opts, cwd=tmp_path)
    assert "Final evaluation" in train.stdout
    # The run's saved config holds the entries: it reproduces the run on its own.
    saved = build_cfg(str(tmp_path / "out" / "config.yaml"))
    assert [entry[0] for entry in saved.DATASETS[key.split(".")[1]]] == [
        f"{layout}_mine_train",
        f"{layout}_mine_val",
    ]
    weights = ["MODEL.WEIGHTS", str(tmp_path / "out" / "model_final.pth")]
    evaluated = run(
        str(REPO / "train_net.py"),
        "--config-file",
        QUICKSTART,
        "--eval-only",
        *opts,
        *weights,
        cwd=tmp_path,
    )
    assert "Final evaluation" in evaluated.stdout and "bbox" in evaluated.stdout
    demo = run(
        str(REPO / "demo.py"),
        "--config-file",
        QUICKSTART,
        "--dataset",
        f"{layout}_mine_val",
        "--output",
        "vis",
        *opts,
        *weights,
        cwd=tmp_path,
    )
    assert "wrote 4 annotated images" in demo.stdout
    assert len(list((tmp_path / "vis").glob("*.png"))) == 4
    run(
        "-m",
        "fcos_d2.analysis",
        "bpr",
        "--config-file",
        QUICKSTART,
        "--dataset",
        f"{layout}_mine_train",
        "--output",
        "analysis",
        *opts,
        cwd=tmp_path,
    )
    bpr = json.loads((tmp_path / "analysis" / "bpr.json").read_text())
    assert bpr["num_images"] == 6 and bpr["results"]["FCOS (FPN)"]["num_boxes"] == 9


def _cfg(**datasets):
    cfg = build_cfg(QUICKSTART)
    for key, value in datasets.items():
        cfg.DATASETS[key] = value
    return cfg


def test_coco_categories_become_contiguous_classes_in_id_order(tmp_path):
    json_file = write_coco(tmp_path, "train", 3, seed=0)
    register_user_datasets(_cfg(COCO_JSON=(("ud_ids", str(json_file), str(tmp_path / "images")),)))
    assert MetadataCatalog.get("ud_ids").thing_classes == ["square", "disc"]
    records = DatasetCatalog.get("ud_ids")
    assert MetadataCatalog.get("ud_ids").thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    # Image 1 has one square; image 2 a disc and a square.
    assert [a["category_id"] for a in records[0]["annotations"]] == [0]
    assert sorted(a["category_id"] for a in records[1]["annotations"]) == [0, 1]
    # Registering the same entry again is a no-op; the same name for other files is an error.
    register_user_datasets(_cfg(COCO_JSON=(("ud_ids", str(json_file), str(tmp_path / "images")),)))
    other = write_coco(tmp_path / "other", "train", 2, seed=3)
    with pytest.raises(DatasetConfigError, match="'ud_ids' is already registered"):
        register_user_datasets(
            _cfg(COCO_JSON=(("ud_ids", str(other), str(tmp_path / "other" / "images")),))
        )


def test_voc_boxes_and_classes_from_the_annotations(tmp_path):
    write_voc(tmp_path, "train", 2, seed=0)
    register_user_datasets(_cfg(VOC_DIR=(("ud_voc", str(tmp_path), "train"),)))
    assert MetadataCatalog.get("ud_voc").thing_classes == ["disc", "square"]  # sorted names
    first = DatasetCatalog.get("ud_voc")[0]
    # VOC's 1-based inclusive xmin/ymin become 0-based: the written box comes back exactly.
    ((category, box),) = draw_records(tmp_path / "again", 1, seed=0)[0][1]
    assert first["annotations"][0]["bbox"] == [float(v) for v in box]
    assert first["annotations"][0]["category_id"] == 1  # square


def _bad_coco(tmp_path: Path, mutate) -> tuple:
    json_file = write_coco(tmp_path, "train", 3, seed=0)
    data = json.loads(json_file.read_text())
    mutate(data, tmp_path)
    json_file.write_text(json.dumps(data))
    return (("ud_bad", str(json_file), str(tmp_path / "images")),)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d, p: d.pop("categories"),
            r"is not a COCO detection json: it lacks \['categories'\]",
        ),
        (
            lambda d, p: d["annotations"].append(dict(d["annotations"][0], image_id=99)),
            r"annotations of image ids not in its 'images': 99",
        ),
        (
            lambda d, p: (p / "images" / "img001.jpg").unlink(),
            r"1 of 3 images listed in .* are not in .*: img001.jpg",
        ),
    ],
    ids=["no-categories", "orphan-annotation", "missing-image-file"],
)
def test_bad_coco_json_is_named(tmp_path, mutate, message):
    with pytest.raises(DatasetConfigError, match=message):
        register_user_datasets(_cfg(COCO_JSON=_bad_coco(tmp_path, mutate)))


def test_missing_paths_bad_entries_and_repeated_names(tmp_path):
    json_file = write_coco(tmp_path, "train", 2, seed=0)
    images = str(tmp_path / "images")
    with pytest.raises(
        DatasetConfigError, match=r"'ud_nojson': annotation file .*nope.json does not exist"
    ):
        register_user_datasets(
            _cfg(COCO_JSON=(("ud_nojson", str(tmp_path / "nope.json"), images),))
        )
    with pytest.raises(DatasetConfigError, match=r"image folder .*nofolder does not exist"):
        register_user_datasets(
            _cfg(COCO_JSON=(("ud_nofolder", str(json_file), str(tmp_path / "nofolder")),))
        )
    with pytest.raises(DatasetConfigError, match=r"DATASETS.COCO_JSON\[0\] must be a triple"):
        register_user_datasets(_cfg(COCO_JSON=(("ud_pair", str(json_file)),)))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetConfigError, match="broken.json is not valid json"):
        register_user_datasets(
            _cfg(COCO_JSON=(("ud_broken", str(tmp_path / "broken.json"), images),))
        )
    with pytest.raises(
        DatasetConfigError, match=r"name the datasets \['ud_twice'\] more than once"
    ):
        register_user_datasets(
            _cfg(
                COCO_JSON=(("ud_twice", str(json_file), images),),
                VOC_DIR=(("ud_twice", str(tmp_path), "train"),),
            )
        )
    # Detectron2's own builtin names are taken too.
    with pytest.raises(DatasetConfigError, match="'coco_2017_val' is already registered"):
        register_user_datasets(_cfg(COCO_JSON=(("coco_2017_val", str(json_file), images),)))


def test_bad_voc_layouts_are_named(tmp_path):
    with pytest.raises(DatasetConfigError, match=r"VOC directory .*absent does not exist"):
        register_user_datasets(_cfg(VOC_DIR=(("ud_v1", str(tmp_path / "absent"), "train"),)))
    write_voc(tmp_path, "train", 3, seed=0)
    with pytest.raises(DatasetConfigError, match=r"split file .*val.txt does not exist"):
        register_user_datasets(_cfg(VOC_DIR=(("ud_v2", str(tmp_path), "val"),)))
    (tmp_path / "JPEGImages" / "train_img002.jpg").unlink()
    with pytest.raises(
        DatasetConfigError,
        match=r"1 of the 3 ids .* have no file in .*JPEGImages: train_img002.jpg",
    ):
        register_user_datasets(_cfg(VOC_DIR=(("ud_v3", str(tmp_path), "train"),)))
    write_voc(tmp_path, "train", 3, seed=0)
    with pytest.raises(
        DatasetConfigError, match=r"VOC_CLASSES=\['square'\] lacks the classes \['disc'\]"
    ):
        register_user_datasets(
            _cfg(VOC_DIR=(("ud_v4", str(tmp_path), "train"),), VOC_CLASSES=("square",))
        )


def test_training_set_without_annotations_stops_before_training(tmp_path):
    from fcos_d2.engine import Trainer, setup

    entries = _bad_coco(tmp_path, lambda d, p: d.update(annotations=[]))
    opts = tiny_opts(
        tmp_path,
        2,
        **{
            "DATASETS.COCO_JSON": str(entries).replace("ud_bad", "ud_empty"),
            "DATASETS.TRAIN": "('ud_empty',)",
            "DATASETS.TEST": "()",
            "MODEL.FCOS.NUM_CLASSES": 2,
        },
    )
    cfg = setup(args_for(opts))
    with pytest.raises(
        DatasetConfigError, match=r"'ud_empty' .* has no image with a \(non-crowd\) annotation"
    ):
        Trainer(cfg)
    assert not (tmp_path / "out" / "model_final.pth").exists()
