"""FCOS as the proposal generator of Detectron2's ProposalNetwork and Faster R-CNN (Sec. 5)."""

import glob

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from helpers import config_path, overfit, shrink, synthetic_image
from torch import nn

from fcos_d2.modeling.box_ops import centerness_from_ltrb, compute_locations
from fcos_d2.modeling.head import FCOSHeadOutputs
from fcos_d2.modeling.proposal_generator import FCOSProposalGenerator, score_to_logit

GT_BOXES = [[10, 15, 50, 60], [60, 30, 120, 110], [30, 70, 70, 100]]
GT_CLASSES = [0, 1, 2]


def _small(cfg, path: str):
    cfg = shrink(cfg, path)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 256
    return cfg


def test_registered_and_selected_by_yaml(cfg):
    model = build_model(_small(cfg, config_path("configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml")))
    assert type(model).__name__ == "ProposalNetwork"
    assert isinstance(model.proposal_generator, FCOSProposalGenerator)
    assert model.proposal_generator.fcos_head.cls_logits.out_channels == 1  # class-agnostic
    # Authors' state-dict names under Detectron2's proposal_generator prefix.
    assert "proposal_generator.fcos_head.ctrness.weight" in model.state_dict()


def test_proposal_fields_counts_and_order(cfg):
    cfg = _small(cfg, config_path("configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml"))
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 30
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [synthetic_image(boxes=GT_BOXES, classes=GT_CLASSES), synthetic_image(seed=1)]
    images = ImageList.from_tensors(
        [(x["image"] - model.pixel_mean) / model.pixel_std for x in batch],
        model.backbone.size_divisibility,
    )
    features = model.backbone(images.tensor)
    gt = [x["instances"] for x in batch]
    for training, cap in ((True, 50), (False, 30)):
        model.train(training)
        with EventStorage():
            proposals, losses = model.proposal_generator(images, features, gt if training else None)
        assert set(losses) == (
            {"loss_fcos_rpn_cls", "loss_fcos_rpn_loc", "loss_fcos_rpn_ctr"} if training else set()
        )
        for p in proposals:
            assert set(p.get_fields()) == {"proposal_boxes", "objectness_logits"}
            assert 0 < len(p) <= cap
            assert p.objectness_logits.dtype == torch.float32
            assert (
                not p.objectness_logits.requires_grad and not p.proposal_boxes.tensor.requires_grad
            )
            logits = p.objectness_logits.tolist()
            assert logits == sorted(logits, reverse=True)
            box = p.proposal_boxes.tensor
            assert (box[:, 0] >= 0).all() and (box[:, 2] <= 128).all() and (box[:, 3] <= 128).all()


def test_objectness_logits_invert_the_score():
    scores = torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(torch.sigmoid(score_to_logit(scores)), scores)


class _IdealHead(nn.Module):
    """Returns fixed outputs: what a perfectly trained class-agnostic head would predict."""

    num_classes = 1

    def __init__(self, outputs: FCOSHeadOutputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, features):
        return self.outputs


def test_ideal_head_outputs_give_the_gt_as_proposals(cfg):
    cfg = _small(cfg, config_path("configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml"))
    generator = build_model(cfg).proposal_generator.eval()
    strides = generator.core.strides
    sizes = [(-(-128 // s), -(-128 // s)) for s in strides]
    locations = compute_locations(sizes, strides, torch.device("cpu"))
    gt = Instances(
        (128, 128),
        gt_boxes=Boxes(torch.tensor(GT_BOXES, dtype=torch.float32)),
        gt_classes=torch.tensor(GT_CLASSES),
    )
    targets = generator.core.target_assigner(locations, [gt])
    is_fg = targets.matched_gt[0] >= 0
    logits = torch.where(is_fg, 10.0, -10.0)
    quality = score_to_logit(torch.where(is_fg, centerness_from_ltrb(targets.reg_targets[0]), 0.5))
    split = [h * w for h, w in sizes]

    def maps(flat, channels):
        return [x.T.reshape(1, channels, h, w) for x, (h, w) in zip(flat.split(split), sizes)]

    generator.fcos_head = _IdealHead(
        FCOSHeadOutputs(
            maps(logits[:, None], 1), maps(targets.reg_targets[0], 4), maps(quality[:, None], 1)
        )
    )
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    features = {f: torch.zeros(1, 1, h, w) for f, (h, w) in zip(generator.in_features, sizes)}
    (proposals,), _ = generator(images, features)
    iou = pairwise_iou(gt.gt_boxes, proposals.proposal_boxes)
    assert (iou.max(dim=1).values > 1 - 1e-5).all()
    # The best proposals are the GT boxes themselves (each box's most central location).
    top = proposals.proposal_boxes[: len(GT_BOXES)]
    assert (pairwise_iou(gt.gt_boxes, top).max(dim=1).values > 1 - 1e-5).all()


@pytest.mark.slow
def test_faster_rcnn_with_fcos_proposals_trains_both_stages_and_overfits(cfg):
    cfg = _small(cfg, config_path("configs/FCOS-RPN/faster_rcnn_R_50_FPN_1x.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [synthetic_image(boxes=GT_BOXES, classes=GT_CLASSES)]
    with EventStorage():
        losses = model(batch)
        assert {
            "loss_cls",
            "loss_box_reg",
            "loss_fcos_rpn_cls",
            "loss_fcos_rpn_loc",
            "loss_fcos_rpn_ctr",
        } == set(losses)
        sum(losses.values()).backward()
        for module in (model.proposal_generator.fcos_head, model.roi_heads.box_predictor):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        model.zero_grad()
    detections = overfit(model, batch, iterations=100)
    top = detections[detections.scores > 0.5]
    iou = pairwise_iou(Boxes(torch.tensor(GT_BOXES, dtype=torch.float32)), top.pred_boxes)
    best_iou, best = iou.max(dim=1)
    assert (best_iou > 0.8).all(), best_iou
    assert top.pred_classes[best].tolist() == GT_CLASSES


def test_proposal_network_output_is_evaluated_by_coco_evaluator(cfg, tmp_path):
    from fcos_d2.data import ShapesSpec, register_shapes_dataset

    name = "shapes_rpn_eval_test"
    if name not in DatasetCatalog.list():
        register_shapes_dataset(
            name, ShapesSpec(num_images=6, image_size=(128, 128), seed=7), tmp_path
        )
    cfg = _small(cfg, config_path("configs/FCOS-RPN/rpn_R_50_FPN_1x.yaml"))
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.DATASETS.TEST = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    from detectron2.data import build_detection_test_loader

    loader = build_detection_test_loader(cfg, name)
    results = inference_on_dataset(
        model, loader, COCOEvaluator(name, output_dir=str(tmp_path / "eval"))
    )
    assert "box_proposals" in results
    for key in ("AR@100", "AR@1000"):
        assert 0.0 <= results["box_proposals"][key] <= 100.0
    # Size buckets without any GT box of that size are NaN, as in COCO.
    assert {"ARs@100", "ARm@100", "ARl@100"} <= set(results["box_proposals"])
    # Known answer: proposals equal to the GT boxes give AR = 100 at every IoU threshold.
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval_gt"))
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        xywh = torch.tensor([a["bbox"] for a in record["annotations"]]).reshape(-1, 4)
        boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        proposals = Instances(
            (record["height"], record["width"]),
            proposal_boxes=boxes,
            objectness_logits=torch.ones(len(boxes)),
        )
        evaluator.process([{"image_id": record["image_id"]}], [{"proposals": proposals}])
    assert evaluator.evaluate()["box_proposals"]["AR@100"] == pytest.approx(100.0)


RPN_CONFIGS = sorted(
    p
    for p in glob.glob(config_path("configs/FCOS-RPN/*.yaml"))
    if not p.split("/")[-1].startswith("Base")
)


@pytest.mark.parametrize("path", RPN_CONFIGS, ids=lambda p: p.split("/")[-1])
def test_every_rpn_config_builds_trains_and_infers(cfg, path):
    cfg = _small(cfg, path)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = [synthetic_image(boxes=GT_BOXES, classes=GT_CLASSES)]
    with EventStorage():
        losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model(batch)
    expected = "proposals" if "rpn_" in path else "instances"
    assert set(out) == {expected}
