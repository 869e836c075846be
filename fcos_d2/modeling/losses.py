"""FCOS losses: eq. (2) (focal + IoU loss) plus the center-ness BCE of Sec. 3.3.

Everything is computed with masks over all locations rather than by gathering positives, so the
training step has no data-dependent shapes and no host-device synchronisation; normalisers stay
tensors and are averaged over workers with an all-reduce.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import Tensor

from ..checks import check_choice
from .box_ops import centerness_from_ltrb, iou_and_giou_from_ltrb
from .targets import FCOSTargets

LOC_LOSS_TYPES = ("iou", "linear_iou", "giou")
BOX_QUALITIES = ("ctrness", "iou")
CLS_NORMALIZERS = ("fg", "moving_fg", "all")
REG_LOSS_WEIGHTINGS = ("ctrness", "none")


def box_loss(pred: Tensor, target: Tensor, loss_type: str) -> tuple[Tensor, Tensor]:
    """Per-location box loss and the IoU it was computed from.

    ``iou``: -ln(IoU) (UnitBox, the paper); ``linear_iou``: 1 - IoU; ``giou``: 1 - GIoU.
    """
    check_choice(
        loss_type, LOC_LOSS_TYPES, "MODEL.FCOS.LOC_LOSS_TYPE", "box_loss argument loss_type"
    )
    iou, giou = iou_and_giou_from_ltrb(pred, target)
    if loss_type == "iou":
        loss = -torch.log(iou.clamp(min=1e-6))
    elif loss_type == "linear_iou":
        loss = 1 - iou
    else:
        loss = 1 - giou
    return loss, iou


def _weight_by_alpha_(
    values: Tensor, index: Tensor, is_fg: Tensor, at_positives: float, elsewhere: float
) -> Tensor:
    """``values`` times ``elsewhere``, but times ``at_positives`` at each location's positive
    class (``index`` where ``is_fg``), in place."""
    at_index = values.gather(-1, index)
    values.mul_(elsewhere)
    return values.scatter_(
        -1, index, torch.where(is_fg, at_positives * at_index, elsewhere * at_index)
    )


class _SigmoidFocalLossSum(torch.autograd.Function):
    """Summed sigmoid focal loss with its gradient computed in the same pass.

    With the sign s = 1 - 2t (t the binary target) and z = s x, the focal loss of logit x is
    alpha_t * q^gamma * softplus(z) with q = sigmoid(z) (Lin et al. 2017, eq. (5)), and its
    derivative is s * alpha_t * q^gamma * (gamma * (1 - q) * softplus(z) + q). Written so, the
    forward and backward make about 15 passes over the (N, L, C) logits, mostly in place, instead
    of the ~40 (each a fresh tensor) that autograd records for fvcore's ``sigmoid_focal_loss``
    (same values: tests/test_losses.py), and the backward keeps one tensor instead of several.
    The authors' CUDA ``SigmoidFocalLoss`` kernel computes the same closed-form gradient.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
        num_classes = logits.shape[-1]
        # Each location has at most one positive class: its logit is read and written through
        # one (N, L, 1) index; background rows (label C) point at class C - 1 and keep their sign.
        is_fg = (labels < num_classes).unsqueeze(-1)
        index = labels.clamp(max=num_classes - 1).unsqueeze(-1)
        z = logits.to(torch.float32, copy=True)
        at_index = z.gather(-1, index)
        z.scatter_(-1, index, torch.where(is_fg, -at_index, at_index))
        q = torch.sigmoid(z)
        # softplus(z) = max(z, 0) + log(1 + exp(-|z|)): faster on CPUs than ATen's softplus or
        # log1p (docs/benchmarks.md). Rounding 1 + exp(-|z|) costs an absolute error below 6e-8,
        # which focal weighting shrinks by q^gamma <= exp(-|z|)^gamma where it matters.
        softplus = z.abs().neg_().exp_().add_(1.0).log_().add_(z.clamp_(min=0))
        q_gamma = q * q if gamma == 2.0 else q.pow(gamma)
        # alpha < 0 turns the class weighting off, as in fvcore.
        alpha_pos, alpha_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
        if ctx.needs_input_grad[0]:
            # dL/dz without alpha_t, in z's buffer: q^gamma * (gamma * (1 - q) * softplus + q).
            grad = torch.sub(q, 1.0, out=z).mul_(softplus).mul_(-gamma).add_(q).mul_(q_gamma)
            # times s * alpha_t: alpha_neg everywhere, -alpha_pos at the positives.
            _weight_by_alpha_(grad, index, is_fg, -alpha_pos, alpha_neg)
            # Kept in float32: under float16 AMP the loss scale multiplies it in backward.
            ctx.save_for_backward(grad)
            ctx.logits_dtype = logits.dtype
        # Each term weighted, then one float32 sum (ATen's cascade summation, as fvcore's sum):
        # the same rounding as fvcore's loss. Summing unweighted terms and correcting the
        # positives afterwards would subtract large sums.
        loss_terms = _weight_by_alpha_(q_gamma.mul_(softplus), index, is_fg, alpha_pos, alpha_neg)
        return loss_terms.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.logits_dtype), None, None, None


def sigmoid_focal_loss_sum(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sum over all locations and classes of the sigmoid focal loss (FCOS eq. (2), first term).

    Args:
        logits: (..., C) class logits; labels: (...) integer labels in [0, C], C = background.
    Returns:
        a float32 scalar, equal to fvcore's ``sigmoid_focal_loss(logits, one_hot(labels),
        alpha, gamma, reduction="sum")``.
    """
    return _SigmoidFocalLossSum.apply(logits, labels, alpha, gamma)


def _mean_over_workers(value: Tensor, enabled: bool = True) -> Tensor:
    if enabled and comm.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / comm.get_world_size()
    return value


class FCOSLoss:
    """Computes the FCOS losses from dense predictions and :class:`FCOSTargets`.

    * classification: sigmoid focal loss over all locations and classes, divided by the number of
      positives averaged over workers (``fg``), its moving average (``moving_fg``) or the number of
      locations (``all``);
    * box: the chosen IoU loss on positives, weighted by the center-ness targets and divided by
      their worker-averaged sum (``reg_loss_weighting="ctrness"``), or unweighted and divided by
      the number of positives (``"none"``, eq. (2));
    * quality: BCE of the center-ness logit against eq. (3) (``box_quality="ctrness"``), or of an
      IoU-quality logit against the detached IoU of the predicted box (``"iou"``; the box loss is
      then unweighted, as in the authors' code), divided by the number of positives.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loc_loss_type: str = "giou",
        box_quality: str = "ctrness",
        cls_normalizer: str = "fg",
        reg_loss_weighting: str = "ctrness",
        cls_loss_weight: float = 1.0,
        moving_fg_momentum: float = 0.9,
        loss_prefix: str = "loss_fcos",
    ):
        for value, allowed, key, arg in (
            (loc_loss_type, LOC_LOSS_TYPES, "LOC_LOSS_TYPE", "loc_loss_type"),
            (box_quality, BOX_QUALITIES, "BOX_QUALITY", "box_quality"),
            (cls_normalizer, CLS_NORMALIZERS, "LOSS_NORMALIZER_CLS", "cls_normalizer"),
            (reg_loss_weighting, REG_LOSS_WEIGHTINGS, "REG_LOSS_WEIGHTING", "reg_loss_weighting"),
        ):
            check_choice(value, allowed, f"MODEL.FCOS.{key}", f"FCOSLoss argument {arg}")
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loc_loss_type = loc_loss_type
        self.box_quality = box_quality
        self.cls_normalizer = cls_normalizer
        self.reg_loss_weighting = reg_loss_weighting
        self.cls_loss_weight = cls_loss_weight
        self.moving_fg_momentum = moving_fg_momentum
        self.loss_prefix = loss_prefix
        self.moving_num_fg: Optional[Tensor] = None

    @classmethod
    def from_config(cls, cfg):
        fcos = cfg.MODEL.FCOS
        return {
            "num_classes": fcos.NUM_CLASSES,
            "focal_alpha": fcos.LOSS_ALPHA,
            "focal_gamma": fcos.LOSS_GAMMA,
            "loc_loss_type": fcos.LOC_LOSS_TYPE,
            "box_quality": fcos.BOX_QUALITY,
            "cls_normalizer": fcos.LOSS_NORMALIZER_CLS,
            "reg_loss_weighting": fcos.REG_LOSS_WEIGHTING,
            "cls_loss_weight": fcos.LOSS_WEIGHT_CLS,
        }

    def __call__(
        self,
        cls_logits: Tensor,
        box_reg: Tensor,
        quality_logits: Tensor,
        targets: FCOSTargets,
        training: bool = True,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """
        Args:
            cls_logits: (N, L, C); box_reg: (N, L, 4) in target units; quality_logits: (N, L).
            training: False for a validation loss: normalizers from this process's batch alone
                (no all-reduce: processes may see different numbers of batches), running state
                (``moving_fg``) read but not updated.
        Returns:
            the loss dict and the number of positives averaged over workers (a tensor).
        """
        is_fg = targets.labels != self.num_classes
        num_pos = _mean_over_workers(is_fg.sum().to(box_reg.dtype), training)
        num_pos_avg = num_pos.clamp(min=1.0)

        loss_cls = sigmoid_focal_loss_sum(
            cls_logits, targets.labels, alpha=self.focal_alpha, gamma=self.focal_gamma
        )
        loss_cls = loss_cls / self._cls_normalizer(num_pos_avg, is_fg, training)

        fg = is_fg.to(box_reg.dtype)
        # Background rows get a dummy unit box so that IoU and center-ness stay finite there:
        # a NaN multiplied by a zero weight would still poison the gradients.
        reg_targets = torch.where(is_fg[..., None], targets.reg_targets, torch.ones_like(box_reg))
        loc_loss, iou = box_loss(box_reg, reg_targets, self.loc_loss_type)
        if self.box_quality == "ctrness":
            quality_targets = centerness_from_ltrb(reg_targets)
            if self.reg_loss_weighting == "ctrness":
                loc_weights = quality_targets * fg
                loc_normalizer = _mean_over_workers(loc_weights.sum(), training).clamp(min=1e-6)
            else:
                loc_weights, loc_normalizer = fg, num_pos_avg
        else:
            quality_targets = iou.detach()
            loc_weights, loc_normalizer = fg, num_pos_avg
        loss_loc = (loc_loss * loc_weights).sum() / loc_normalizer
        loss_quality = (
            F.binary_cross_entropy_with_logits(quality_logits, quality_targets, reduction="none")
            * fg
        ).sum() / num_pos_avg
        quality_name = "ctr" if self.box_quality == "ctrness" else "iou"
        losses = {
            f"{self.loss_prefix}_cls": loss_cls * self.cls_loss_weight,
            f"{self.loss_prefix}_loc": loss_loc,
            f"{self.loss_prefix}_{quality_name}": loss_quality,
        }
        return losses, num_pos

    def state_dict(self) -> dict[str, Optional[Tensor]]:
        """The running state (``moving_fg``'s average), for checkpoints that resume exactly."""
        return {"moving_num_fg": self.moving_num_fg}

    def load_state_dict(self, state: dict[str, Optional[Tensor]]) -> None:
        self.moving_num_fg = state["moving_num_fg"]

    def _cls_normalizer(self, num_pos_avg: Tensor, is_fg: Tensor, training: bool) -> Tensor:
        if self.cls_normalizer == "fg":
            return num_pos_avg
        if self.cls_normalizer == "moving_fg":
            previous = (
                self.moving_num_fg.to(num_pos_avg)  # a checkpoint's is on the CPU
                if self.moving_num_fg is not None
                else num_pos_avg.new_tensor(100.0)
            )
            momentum = self.moving_fg_momentum
            moving = (momentum * previous + (1 - momentum) * num_pos_avg).detach()
            if training:
                self.moving_num_fg = moving
            return moving
        count = torch.full((), float(is_fg.numel()), device=is_fg.device)
        return _mean_over_workers(count, training)
