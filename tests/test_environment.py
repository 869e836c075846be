"""The environment the project stands on: detectron2, torchvision ops, the ResNet-FPN backbone."""

import torch


def test_detectron2_imports_and_registers_fcos():
    import detectron2
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    import fcos_d2  # noqa: F401  (registers on import)

    assert detectron2.__version__
    assert META_ARCH_REGISTRY.get("FCOS").__name__ == "FCOS"
    assert BACKBONE_REGISTRY.get("build_fcos_resnet_fpn_backbone") is not None


def test_torchvision_nms_on_cpu():
    from torchvision.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU of the first two is 81 / 119 = 0.68: suppressed at 0.5, kept at 0.7.
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]


def test_torchvision_roi_align_on_cpu():
    from torchvision.ops import roi_align

    # A feature map whose value is its x coordinate: the average over any box is the box's x center.
    feature = torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None]
    rois = torch.tensor([[0, 2.0, 3.0, 6.0, 9.0]])
    out = roi_align(
        feature, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True
    )
    assert out.shape == (1, 1, 2, 2)
    # aligned=True samples at pixel centres shifted by -0.5: bins cover x in [1.5, 3.5], [3.5, 5.5].
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(out[0, 0, :, 1], torch.tensor([4.5, 4.5]))


def test_resnet_fpn_backbone_shapes(cfg):
    from detectron2.modeling import build_backbone

    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    backbone = build_backbone(cfg).eval()
    expected = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    shapes = backbone.output_shape()
    assert {name: spec.stride for name, spec in shapes.items()} == expected
    assert all(spec.channels == 256 for spec in shapes.values())
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 256, 320))
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "p3": (1, 256, 32, 40),
        "p4": (1, 256, 16, 20),
        "p5": (1, 256, 8, 10),
        "p6": (1, 256, 4, 5),
        "p7": (1, 256, 2, 3),
    }
