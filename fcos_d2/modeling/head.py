"""The FCOS head (Sec. 3.1-3.3, Fig. 2): shared towers, per-level scales and the three predictors.

State-dict names follow the authors' Detectron2 release (``cls_tower.*``, ``bbox_tower.*``,
``share_tower.*``, ``cls_logits``, ``bbox_pred``, ``ctrness``, ``scales.{i}.scale``), so their
checkpoints load after renaming the ``proposal_generator.fcos_head.`` prefix to ``head.``.
"""

import math
from typing import NamedTuple, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import NaiveSyncBatchNorm, ShapeSpec
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import DeformConv2d

from ..checks import check_choice, check_that

# "" and the authors' "none" both mean no normalization in the towers.
NORMS = ("GN", "BN", "SyncBN", "", "none")
BOX_ACTIVATIONS = ("relu", "exp")
_WHERE = "FCOSHead argument"


class FCOSHeadOutputs(NamedTuple):
    """Per-level raw outputs, each a list over levels of (N, K, H_i, W_i) tensors.

    ``box_reg`` is already activated (relu or exp of s_i * x), in the units of the regression
    targets: pixels, or pixels / stride when targets are stride-normalized.
    """

    cls_logits: list[Tensor]
    box_reg: list[Tensor]
    quality_logits: list[Tensor]


class Scale(nn.Module):
    """The trainable per-level scalar s_i of Sec. 3.2 (exp(s_i x) in place of exp(x))."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class PerLevelBatchNorm(nn.ModuleList):
    """One BatchNorm per FPN level: feature statistics differ too much across levels to share."""

    def forward(self, x: Tensor, level: Optional[int] = None) -> Tensor:  # type: ignore[override]
        if level is None:
            raise ValueError(
                f"this norm has one BatchNorm per level (0..{len(self) - 1}): pass the level"
            )
        return self[level](x)


class DeformableConv3x3(nn.Module):
    """3x3 deformable conv (torchvision op) whose offsets come from a zero-initialized 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.offset = nn.Conv2d(in_channels, 2 * 3 * 3, 3, padding=1)
        self.conv = DeformConv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.offset(x))


def _make_norm(norm: str, channels: int, num_levels: int) -> Optional[nn.Module]:
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "BN":
        return PerLevelBatchNorm([nn.BatchNorm2d(channels) for _ in range(num_levels)])
    if norm == "SyncBN":
        return PerLevelBatchNorm([NaiveSyncBatchNorm(channels) for _ in range(num_levels)])
    return None


class Tower(nn.Sequential):
    """A stack of [3x3 conv, norm, ReLU] blocks (Fig. 2) applied to one FPN level at a time.

    ``forward(x, level)``: the level picks the BatchNorm of :class:`PerLevelBatchNorm` layers; other
    layers ignore it, so towers without per-level BatchNorm also run as ``tower(x)``. Indices in
    the state dict are the authors' (conv 0, norm 1, ReLU 2, conv 3...).
    """

    def __init__(
        self, num_convs: int, channels: int, norm: str, num_levels: int, deformable_last: bool
    ):
        layers: list[nn.Module] = []
        for i in range(num_convs):
            if deformable_last and i == num_convs - 1:
                layers.append(DeformableConv3x3(channels, channels))
            else:
                layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            norm_layer = _make_norm(norm, channels, num_levels)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU())
        super().__init__(*layers)

    def forward(self, x: Tensor, level: Optional[int] = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, level) if isinstance(layer, PerLevelBatchNorm) else layer(x)
        return x


class FCOSHead(nn.Module):
    """Classification tower -> C binary classifiers; box tower -> (l, t, r, b) and center-ness.

    The center-ness (or IoU-quality) predictor sits on the box tower (improved default) or on the
    classification tower (``centerness_on_reg=False``, Fig. 2 of the paper).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: list[ShapeSpec],
        num_classes: int,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        num_share_convs: int = 0,
        norm: str = "GN",
        use_deformable: bool = False,
        use_scale: bool = True,
        box_activation: str = "relu",
        centerness_on_reg: bool = True,
        prior_prob: float = 0.01,
        initial_box_distance: float = 1.0,
        checkpoint_towers: bool = False,
    ):
        """
        Args:
            initial_box_distance: the (l, t, r, b) every location predicts at initialisation with
                ``box_activation="exp"``, in target units. 1 suits stride-normalized targets (one
                stride); with targets in pixels, ``from_config`` passes the smallest stride, since
                1-pixel boxes (IoU ~1e-3 with the targets) make the early steps so large that SGD
                does not settle (README, "The ICCV 2019 settings").
            checkpoint_towers: in training, keep only each tower's input for the backward pass
                and run the tower again there (``torch.utils.checkpoint``): the towers' saved
                activations (over a third of the training step's) for a few percent more time;
                results are unchanged. Not with BatchNorm, whose statistics would update twice.
        """
        super().__init__()
        check_choice(norm, NORMS, "MODEL.FCOS.NORM", f"{_WHERE} norm")
        check_that(
            not (checkpoint_towers and norm in ("BN", "SyncBN")),
            "MODEL.FCOS.CHECKPOINT_TOWERS",
            "False with MODEL.FCOS.NORM BN or SyncBN (recomputing would update their statistics "
            "twice)",
            checkpoint_towers,
            f"{_WHERE} checkpoint_towers",
        )
        check_choice(
            box_activation, BOX_ACTIVATIONS, "MODEL.FCOS.BOX_ACTIVATION", f"{_WHERE} box_activation"
        )
        check_that(
            0 < prior_prob < 1,
            "MODEL.FCOS.PRIOR_PROB",
            "in (0, 1)",
            prior_prob,
            f"{_WHERE} prior_prob",
        )
        check_that(
            num_classes >= 1, "MODEL.FCOS.NUM_CLASSES", ">= 1", num_classes, f"{_WHERE} num_classes"
        )
        channels = {s.channels for s in input_shape}
        check_that(
            len(channels) == 1,
            "MODEL.FPN.OUT_CHANNELS",
            "the same on every head input level",
            sorted(channels),
            f"{_WHERE} input_shape",
        )
        in_channels = channels.pop()
        check_that(
            norm != "GN" or in_channels % 32 == 0,
            f"MODEL.FPN.OUT_CHANNELS: the head's channels ({in_channels})",
            "a multiple of 32 with MODEL.FCOS.NORM=GN (32 groups)",
            in_channels,
            f"{_WHERE} input_shape",
        )
        num_levels = len(input_shape)
        self.num_classes = num_classes
        self.box_activation = box_activation
        self.centerness_on_reg = centerness_on_reg
        self.checkpoint_towers = checkpoint_towers

        self.cls_tower = Tower(num_cls_convs, in_channels, norm, num_levels, use_deformable)
        self.bbox_tower = Tower(num_box_convs, in_channels, norm, num_levels, use_deformable)
        self.share_tower = Tower(num_share_convs, in_channels, norm, num_levels, False)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if use_scale else None

        offset_convs = {id(m.offset) for m in self.modules() if isinstance(m, DeformableConv3x3)}
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, DeformConv2d)) and id(module) not in offset_convs:
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        # Sec. 3.1 / RetinaNet: start every classifier at prior_prob to avoid an early loss blow-up.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        if box_activation == "exp":
            check_that(
                initial_box_distance > 0,
                "MODEL.FCOS.INITIAL_BOX_DISTANCE",
                "> 0 (0 in the config means one stride)",
                initial_box_distance,
                _WHERE,
            )
            # exp(s * b) = initial_box_distance with s = 1 and zero weights.
            nn.init.constant_(self.bbox_pred.bias, math.log(initial_box_distance))

    @classmethod
    def from_config(cls, cfg, input_shape: list[ShapeSpec]):
        fcos = cfg.MODEL.FCOS
        return {
            "input_shape": input_shape,
            "num_classes": fcos.NUM_CLASSES,
            "num_cls_convs": fcos.NUM_CLS_CONVS,
            "num_box_convs": fcos.NUM_BOX_CONVS,
            "num_share_convs": fcos.NUM_SHARE_CONVS,
            "norm": fcos.NORM,
            "use_deformable": fcos.USE_DEFORMABLE,
            "use_scale": fcos.USE_SCALE,
            "box_activation": fcos.BOX_ACTIVATION,
            "centerness_on_reg": fcos.CENTERNESS_ON_REG,
            "prior_prob": fcos.PRIOR_PROB,
            "initial_box_distance": fcos.INITIAL_BOX_DISTANCE
            or (1.0 if fcos.NORM_REG_TARGETS else float(input_shape[0].stride)),
            "checkpoint_towers": fcos.CHECKPOINT_TOWERS,
        }

    def forward(self, features: list[Tensor]) -> FCOSHeadOutputs:
        cls_logits, box_reg, quality_logits = [], [], []
        for level, feature in enumerate(features):
            shared = self._run_tower(self.share_tower, feature, level)
            cls_feature = self._run_tower(self.cls_tower, shared, level)
            box_feature = self._run_tower(self.bbox_tower, shared, level)
            cls_logits.append(self.cls_logits(cls_feature))
            quality_logits.append(
                self.ctrness(box_feature if self.centerness_on_reg else cls_feature)
            )
            reg = self.bbox_pred(box_feature).float()  # exp/relu of bf16 would cost ~0.4% precision
            if self.scales is not None:
                reg = self.scales[level](reg)
            box_reg.append(torch.relu(reg) if self.box_activation == "relu" else torch.exp(reg))
        return FCOSHeadOutputs(cls_logits, box_reg, quality_logits)

    def _run_tower(self, tower: Tower, x: Tensor, level: int) -> Tensor:
        if self.checkpoint_towers and len(tower) and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(tower, x, level, use_reentrant=False)
        return tower(x, level)
