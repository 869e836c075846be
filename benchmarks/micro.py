"""Component micro-benchmarks for optimising fcos-d2 on a busy machine.

    python benchmarks/micro.py assign --boxes 10 100 1000 5000
    python benchmarks/micro.py loss postprocess

Times are the minimum over ``--repeats`` of the process CPU time on one thread, which other
processes on the machine disturb far less than wall time; compare them only with each other.
Peak memory needs a fresh process per measurement: see ``run.py --only assign_loss_memory``.
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.inputs import candidate_dense_outputs, random_batch, random_dense_outputs  # noqa: E402
from benchmarks.models import TestSettings, build_detector  # noqa: E402
from benchmarks.workloads import empty_features, gt_instances_of  # noqa: E402


def measure(function, repeats: int) -> float:
    """Minimum CPU milliseconds of ``function`` after one warm-up run."""
    function()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return min(times) * 1000


def assign_cases(ours, theirs, size, boxes):
    outputs = random_dense_outputs(*size)
    features = empty_features(outputs)
    gt = gt_instances_of(random_batch(*size, boxes))
    core, model = ours.model.core, theirs.model
    # Locations and grid sizes are computed once, as D2's anchors are: only assignment is timed.
    locations, grid_sizes = core.locations(features), [f.shape[-2:] for f in features]
    anchors = model.anchor_generator(features)
    yield "fcos-d2 FCOSTargetAssigner", lambda: core.target_assigner(locations, gt, grid_sizes)
    yield "D2 FCOS label_anchors", lambda: model.label_anchors(anchors, gt)


def loss_cases(ours, theirs, size, boxes):
    from detectron2.utils.events import EventStorage

    from fcos_d2.modeling.core import flatten_predictions

    outputs = random_dense_outputs(*size)
    features = empty_features(outputs)
    gt = gt_instances_of(random_batch(*size, boxes))
    core, model = ours.model.core, theirs.model
    targets = core.targets(features, gt)
    anchors = model.anchor_generator(features)
    labels, matched_boxes = model.label_anchors(anchors, gt)

    def our_loss():
        dense = outputs.clone(requires_grad=True)
        losses, _ = core.loss(
            flatten_predictions(dense.cls_logits, 80),
            flatten_predictions(dense.box_reg, 4),
            flatten_predictions(dense.ctrness, 1).squeeze(2),
            targets,
        )
        sum(losses.values()).backward()

    def their_loss():
        dense = outputs.clone(requires_grad=True)
        logits, deltas, ctrness = model._transpose_dense_predictions(
            [dense.cls_logits, dense.box_reg, dense.ctrness], [80, 4, 1]
        )
        with EventStorage(0):
            losses = model.losses(anchors, logits, labels, deltas, matched_boxes, ctrness)
        sum(losses.values()).backward()

    yield "fcos-d2 FCOSLoss fwd+bwd", our_loss
    yield "D2 FCOS losses fwd+bwd", their_loss


def postprocess_cases(ours, theirs, size, boxes):
    from benchmarks.workloads import postprocess_workload

    outputs = candidate_dense_outputs(*size, 2000)
    settings = TestSettings(score_threshold=0.05)
    for name, detector in (("fcos-d2", ours), ("D2 FCOS", theirs)):
        workload = postprocess_workload(detector, outputs, size[1:], settings)
        yield f"{name} post-processing", workload


CASES = {"assign": assign_cases, "loss": loss_cases, "postprocess": postprocess_cases}
SIZES = {"assign": (2, 512, 640), "loss": (2, 512, 640), "postprocess": (1, 800, 1216)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--boxes", type=int, nargs="+", default=[100])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = TestSettings()
    ours = build_detector("fcos_d2", settings, "cpu", network=False)
    theirs = build_detector("d2_fcos", settings, "cpu", network=False)
    for case in args.cases:
        for boxes in args.boxes if case != "postprocess" else [0]:
            for label, function in CASES[case](ours, theirs, SIZES[case], boxes):
                ms = measure(function, args.repeats)
                what = f"{boxes} boxes" if boxes else "1000 candidates/level"
                print(f"{case:11s} {what:>21s}  {label:32s} {ms:9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
