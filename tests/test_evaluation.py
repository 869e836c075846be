"""COCO evaluation: faster-coco-eval gives Detectron2's COCOEvaluator the same numbers as
pycocotools, and is used only where Detectron2 has no compiled COCOeval_opt."""

import sys

import numpy as np
import pytest
from helpers import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.coco_eval import (  # noqa: E402
    as_coco_results,
    cocoeval_stats,
    model_outputs,
    register,
    run_evaluator,
    synthetic_coco,
)
from fcos_d2 import evaluation  # noqa: E402
from fcos_d2.d2_compat import detectron2_has_compiled_coco_eval  # noqa: E402


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """60 images, ~7 boxes each (1% crowd), 100 detections each, registered for COCOEvaluator."""
    assert evaluation.faster_coco_eval_class() is not None, (
        "faster-coco-eval, a dependency of fcos-d2, is not installed: run make setup"
    )
    gt, predictions = synthetic_coco(num_images=60, seed=3)
    name = register(gt, tmp_path_factory.mktemp("coco"), "test_faster_coco_eval")
    return name, gt, predictions


def test_the_12_numbers_equal_pycocotools(case):
    from detectron2.evaluation import COCOEvaluator
    from pycocotools.cocoeval import COCOeval

    name, _, predictions = case
    coco_gt = COCOEvaluator(name, output_dir=None)._coco_api
    results = as_coco_results(predictions)
    official, _ = cocoeval_stats(COCOeval, coco_gt, results)
    faster, _ = cocoeval_stats(evaluation.faster_coco_eval_class(), coco_gt, results)
    assert 0.05 < official[0] < 0.95 and official.min() >= 0  # a real, non-trivial case
    np.testing.assert_allclose(faster, official, rtol=0, atol=1e-4)


def test_evaluator_results_equal_detectron2s(case, monkeypatch):
    from detectron2.evaluation import COCOEvaluator, coco_evaluation

    name, _, predictions = case
    inputs, outputs = model_outputs(predictions)
    official, _, _ = run_evaluator(COCOEvaluator(name, output_dir=None), inputs, outputs)
    faster = evaluation.FasterCOCOEvaluator(name, output_dir=None)
    assert faster.backend == "faster-coco-eval"  # this detectron2 has no compiled COCOeval_opt
    used = []

    class Recording(evaluation.faster_coco_eval_class()):
        def summarize(self):
            used.append(type(self))
            super().summarize()

    monkeypatch.setattr(evaluation, "faster_coco_eval_class", lambda: Recording)
    results, _, _ = run_evaluator(faster, inputs, outputs)
    assert used == [Recording]  # faster-coco-eval did the evaluation
    assert coco_evaluation.COCOeval.__module__.startswith("pycocotools")  # restored afterwards
    assert set(results["bbox"]) == set(official["bbox"])  # AP, AP50... and every class's AP
    for key, value in official["bbox"].items():
        assert results["bbox"][key] == pytest.approx(value, abs=1e-2), key  # in %: 1e-4


def test_backend_choice(monkeypatch):
    assert not detectron2_has_compiled_coco_eval()  # the pure-Python detectron2 of the set-up
    assert evaluation.coco_eval_backend() == "faster-coco-eval"
    assert evaluation.coco_eval_backend(use_fast_impl=False) == "pycocotools"  # official asked
    # Detectron2's own compiled evaluator, where it exists, is kept.
    monkeypatch.setattr(evaluation, "detectron2_has_compiled_coco_eval", lambda: True)
    assert evaluation.coco_eval_backend() == "detectron2"
    monkeypatch.undo()
    monkeypatch.setattr(evaluation, "faster_coco_eval_class", lambda: None)  # not installed
    assert evaluation.coco_eval_backend() == "pycocotools"


def test_image_ids_that_are_not_integers_are_evaluated_with_pycocotools(tmp_path):
    """Pascal VOC datasets name their images by file; faster-coco-eval cannot index those."""
    from detectron2.evaluation import COCOEvaluator

    gt, predictions = synthetic_coco(num_images=8, seed=4)
    for record in [*gt["images"], *gt["annotations"], *predictions]:
        key = "id" if "file_name" in record else "image_id"
        record[key] = f"img{record[key]:03d}"
    name = register(gt, tmp_path, "test_string_image_ids")
    inputs, outputs = model_outputs(predictions)
    official, _, _ = run_evaluator(COCOEvaluator(name, output_dir=None), inputs, outputs)
    faster = evaluation.FasterCOCOEvaluator(name, output_dir=None)
    assert faster.backend == "faster-coco-eval"
    results, _, _ = run_evaluator(faster, inputs, outputs)
    assert results["bbox"]["AP"] > 0 and set(results["bbox"]) == set(official["bbox"])
    for key, value in official["bbox"].items():  # the same code: the same numbers (NaN: no gt)
        np.testing.assert_equal(results["bbox"][key], value, err_msg=key)
