"""FCOS losses on crafted predictions against closed-form values."""

import math

import pytest
import torch

from fcos_d2.modeling.box_ops import iou_and_giou_from_ltrb
from fcos_d2.modeling.losses import FCOSLoss, box_loss
from fcos_d2.modeling.targets import FCOSTargets

LN2 = math.log(2.0)
# Focal loss at p = 0.5 (logit 0), alpha 0.25, gamma 2: positive 0.25 * 0.5^2 * ln 2, negative
# 0.75 * 0.5^2 * ln 2.
FOCAL_POS_AT_HALF = 0.25 * 0.25 * LN2
FOCAL_NEG_AT_HALF = 0.75 * 0.25 * LN2


def test_iou_and_giou_from_ltrb_closed_form():
    # pred (2, .5, .5, 1): 2.5 x 1.5 = 3.75; target (1, 1, 1, 1): 2 x 2 = 4;
    # intersection (1 + .5) x (.5 + 1) = 2.25, union 5.5, enclosing (2 + 1) x (1 + 1) = 6.
    pred = torch.tensor([[2.0, 0.5, 0.5, 1.0]])
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    iou, giou = iou_and_giou_from_ltrb(pred, target)
    assert iou.item() == pytest.approx(2.25 / 5.5)
    assert giou.item() == pytest.approx(2.25 / 5.5 - 0.5 / 6)
    assert box_loss(pred, target, "iou")[0].item() == pytest.approx(-math.log(2.25 / 5.5))
    assert box_loss(pred, target, "linear_iou")[0].item() == pytest.approx(1 - 2.25 / 5.5)
    assert box_loss(pred, target, "giou")[0].item() == pytest.approx(1 - 2.25 / 5.5 + 0.5 / 6)
    # Identical boxes: zero loss for all three.
    for kind in ("iou", "linear_iou", "giou"):
        assert box_loss(target, target, kind)[0].item() == pytest.approx(0.0, abs=1e-6)


def _crafted():
    """One image, 3 locations, 2 classes: two positives (classes 1 and 0) and one background.

    Targets (1,1,1,1) (center-ness 1) and (1,2,3,4) (center-ness sqrt(1/3 * 2/4) = sqrt(1/6)).
    Predictions: all class and quality logits 0; boxes (2,.5,.5,1) and exactly (1,2,3,4).
    """
    targets = FCOSTargets(
        labels=torch.tensor([[1, 0, 2]]),
        reg_targets=torch.tensor([[[1.0, 1, 1, 1], [1, 2, 3, 4], [0, 0, 0, 0]]]),
        matched_gt=torch.tensor([[0, 1, -1]]),
    )
    cls_logits = torch.zeros(1, 3, 2, requires_grad=True)
    box_reg = torch.tensor([[[2.0, 0.5, 0.5, 1.0], [1, 2, 3, 4], [5, 5, 5, 5]]], requires_grad=True)
    quality_logits = torch.zeros(1, 3, requires_grad=True)
    return cls_logits, box_reg, quality_logits, targets


def test_default_losses_closed_form():
    cls_logits, box_reg, quality_logits, targets = _crafted()
    losses, num_pos = FCOSLoss(num_classes=2)(cls_logits, box_reg, quality_logits, targets)
    # 6 (location, class) pairs: 2 positive, 4 negative; normalised by 2 positives.
    assert num_pos.item() == 2
    expected_cls = (2 * FOCAL_POS_AT_HALF + 4 * FOCAL_NEG_AT_HALF) / 2
    assert losses["loss_fcos_cls"].item() == pytest.approx(expected_cls)
    # GIoU loss weighted by center-ness targets (1 and sqrt(1/6)), normalised by their sum.
    ctr = [1.0, math.sqrt(1 / 6)]
    giou_losses = [1 - 2.25 / 5.5 + 0.5 / 6, 0.0]
    expected_loc = (ctr[0] * giou_losses[0] + ctr[1] * giou_losses[1]) / sum(ctr)
    assert losses["loss_fcos_loc"].item() == pytest.approx(expected_loc)
    # BCE at logit 0 is -(t ln .5 + (1 - t) ln .5) = ln 2 for any target: (ln 2 + ln 2) / 2.
    assert losses["loss_fcos_ctr"].item() == pytest.approx(LN2)
    total = sum(losses.values())
    total.backward()
    # Background locations get no box or quality gradient.
    assert box_reg.grad[0, 2].abs().sum() == 0
    assert quality_logits.grad[0, 2] == 0


def test_paper_normalisers_iou_loss_unweighted():
    cls_logits, box_reg, quality_logits, targets = _crafted()
    loss = FCOSLoss(num_classes=2, loc_loss_type="iou", reg_loss_weighting="none")
    losses, _ = loss(cls_logits, box_reg, quality_logits, targets)
    assert losses["loss_fcos_loc"].item() == pytest.approx(
        (-math.log(2.25 / 5.5) + 0.0) / 2, abs=1e-6
    )


def test_iou_quality_targets_are_detached_ious_and_box_loss_unweighted():
    cls_logits, box_reg, quality_logits, targets = _crafted()
    loss = FCOSLoss(num_classes=2, box_quality="iou", loc_loss_type="linear_iou")
    losses, _ = loss(cls_logits, box_reg, quality_logits, targets)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_iou"}
    assert losses["loss_fcos_loc"].item() == pytest.approx((1 - 2.25 / 5.5) / 2, abs=1e-6)
    # BCE at logit 0 is ln 2 for any target in [0, 1].
    assert losses["loss_fcos_iou"].item() == pytest.approx(LN2)
    # With a quality logit of 3, the BCE against IoU q is softplus(3) - 3 q.
    quality_logits = torch.full((1, 3), 3.0)
    losses, _ = loss(cls_logits, box_reg, quality_logits, targets)
    softplus3 = math.log1p(math.exp(3.0))
    expected = ((softplus3 - 3 * 2.25 / 5.5) + (softplus3 - 3 * 1.0)) / 2
    assert losses["loss_fcos_iou"].item() == pytest.approx(expected, rel=1e-5)


def test_cls_normalisers_all_and_moving_fg():
    cls_logits, box_reg, quality_logits, targets = _crafted()
    raw_sum = 2 * FOCAL_POS_AT_HALF + 4 * FOCAL_NEG_AT_HALF
    losses, _ = FCOSLoss(num_classes=2, cls_normalizer="all")(
        cls_logits, box_reg, quality_logits, targets
    )
    assert losses["loss_fcos_cls"].item() == pytest.approx(raw_sum / 3)  # 3 locations
    moving = FCOSLoss(num_classes=2, cls_normalizer="moving_fg")
    losses, _ = moving(cls_logits, box_reg, quality_logits, targets)
    first = 0.9 * 100 + 0.1 * 2  # EMA starts at 100, as in the authors' code
    assert losses["loss_fcos_cls"].item() == pytest.approx(raw_sum / first)
    losses, _ = moving(cls_logits, box_reg, quality_logits, targets)
    assert losses["loss_fcos_cls"].item() == pytest.approx(raw_sum / (0.9 * first + 0.1 * 2))


def test_batch_without_positives_gives_finite_losses_and_a_graph():
    labels = torch.full((2, 5), 3)
    targets = FCOSTargets(labels, torch.zeros(2, 5, 4), torch.full((2, 5), -1))
    cls_logits = torch.zeros(2, 5, 3, requires_grad=True)
    box_reg = torch.rand(2, 5, 4).requires_grad_()
    quality_logits = torch.zeros(2, 5, requires_grad=True)
    for kw in ({}, {"box_quality": "iou"}, {"loc_loss_type": "iou", "reg_loss_weighting": "none"}):
        losses, num_pos = FCOSLoss(num_classes=3, **kw)(
            cls_logits, box_reg, quality_logits, targets
        )
        assert num_pos.item() == 0
        total = sum(losses.values())
        assert torch.isfinite(total)
        # Normaliser clamps to 1: all 30 (location, class) pairs are negatives at p = 0.5.
        assert losses["loss_fcos_cls"].item() == pytest.approx(30 * FOCAL_NEG_AT_HALF)
        total.backward()
        assert torch.isfinite(box_reg.grad).all() and torch.isfinite(cls_logits.grad).all()


def test_bad_loss_type_is_named():
    with pytest.raises(ValueError, match="LOC_LOSS_TYPE.*'smooth_l1'"):
        FCOSLoss(num_classes=2, loc_loss_type="smooth_l1")


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5), (-1.0, 2.0), (0.25, 0.0)])
def test_fused_focal_loss_matches_fvcore_value_and_gradient(alpha, gamma):
    from fvcore.nn import sigmoid_focal_loss

    from fcos_d2.modeling.losses import sigmoid_focal_loss_sum

    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    logits = torch.randn(2, 40, num_classes, generator=generator, dtype=torch.float64) * 4
    logits[0, :3] = torch.tensor([-40.0, 40.0, 0.0])[:, None]  # saturated and balanced logits
    labels = torch.randint(0, num_classes + 1, (2, 40), generator=generator)
    labels[0, :3] = torch.tensor([0, 0, num_classes])

    ours_input = logits.clone().requires_grad_()
    ours = sigmoid_focal_loss_sum(ours_input, labels, alpha, gamma)
    ours.backward(torch.tensor(3.0, dtype=ours.dtype))

    reference_input = logits.clone().requires_grad_()
    one_hot = torch.nn.functional.one_hot(labels, num_classes + 1)[..., :num_classes]
    reference = sigmoid_focal_loss(reference_input, one_hot.double(), alpha, gamma, "sum")
    (3 * reference).backward()

    # fvcore casts its inputs to float32 too: the two differ by float32 rounding only. Against
    # float64: test_fused_focal_loss_rounds_no_worse_than_fvcores_float32_loss.
    assert ours.item() == pytest.approx(reference.item(), rel=3e-7)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(ours_input.grad).all()


def focal_loss_float64(logits, labels, alpha=0.25, gamma=2.0):
    """Eq. (5) of Lin et al. (2017) in float64, term by term: the reference for rounding."""
    targets = torch.nn.functional.one_hot(labels, logits.shape[-1] + 1)[..., :-1].double()
    x = logits.double()
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum().item()


@pytest.mark.parametrize(
    "scale, positives", [(2.0, 0.01), (4.0, 0.01), (20.0, 0.01), (2.0, 0.3)], ids=str
)
def test_fused_focal_loss_rounds_no_worse_than_fvcores_float32_loss(scale, positives):
    """On a benchmark-sized batch (2 x 6,820 locations x 80 classes: 1.09M logits), from typical
    to saturated logits and many positives, the float32 fused loss is within float32 summation
    error of the float64 value: never further off than fvcore's own float32 loss."""
    from fvcore.nn import sigmoid_focal_loss

    from fcos_d2.modeling.losses import sigmoid_focal_loss_sum

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6820, 80, generator=generator) * scale - 4.0
    labels = torch.full((2, 6820), 80)
    chosen = torch.rand(2, 6820, generator=generator) < positives
    labels[chosen] = torch.randint(80, (int(chosen.sum()),), generator=generator)
    exact = focal_loss_float64(logits, labels)
    one_hot = torch.nn.functional.one_hot(labels, 81)[..., :80].float()
    fvcore_error = abs(sigmoid_focal_loss(logits, one_hot, 0.25, 2.0, "sum").item() - exact)
    ours_error = abs(sigmoid_focal_loss_sum(logits, labels).item() - exact)
    assert ours_error / exact < 1.5e-7  # about float32's epsilon (1.2e-7)
    assert ours_error <= 1.05 * fvcore_error + 1e-9 * exact


def test_fused_focal_loss_without_grad_and_in_bfloat16():
    from fcos_d2.modeling.losses import sigmoid_focal_loss_sum

    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[1, 0, 2]])
    expected = 2 * FOCAL_POS_AT_HALF + 4 * FOCAL_NEG_AT_HALF
    assert sigmoid_focal_loss_sum(logits, labels).item() == pytest.approx(expected)
    bf16 = logits.bfloat16().requires_grad_()
    loss = sigmoid_focal_loss_sum(bf16, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected)
    assert bf16.grad.dtype == torch.bfloat16
    # d/dx at x = 0: negative 0.75 * 0.25 * (2 * 0.5 * ln 2 + 0.5); positive the opposite with 0.25.
    negative = 0.75 * 0.25 * (2 * 0.5 * LN2 + 0.5)
    positive = -0.25 * 0.25 * (2 * 0.5 * LN2 + 0.5)
    expected_grad = torch.tensor([[[negative, positive], [positive, negative], [negative] * 2]])
    torch.testing.assert_close(bf16.grad.float(), expected_grad, rtol=1e-2, atol=1e-3)
