"""Synthetic inputs shared by every detector: images, ground-truth boxes, dense head outputs.

Everything is drawn from a seeded generator, so each detector (and each run) sees the same data.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_CLASSES = 80
STRIDES = (8, 16, 32, 64, 128)


@dataclass
class Batch:
    """Images (N, 3, H, W) with values in [0, 255] and per-image boxes (G, 4, XYXY) and classes."""

    images: Tensor
    boxes: list[Tensor]
    classes: list[Tensor]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def to(self, device) -> "Batch":
        return Batch(
            self.images.to(device),
            [b.to(device) for b in self.boxes],
            [c.to(device) for c in self.classes],
        )


def random_boxes(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """``count`` valid XYXY boxes inside the image, sides log-uniform in [8, image side] pixels."""
    low = torch.log(torch.tensor(8.0))
    sides = []
    for extent in (width, height):
        high = torch.log(torch.tensor(float(extent)))
        side = torch.exp(low + (high - low) * torch.rand(count, generator=generator))
        start = (extent - side) * torch.rand(count, generator=generator)
        sides.append((start, start + side))
    (x0, x1), (y0, y1) = sides
    return torch.stack([x0, y0, x1, y1], dim=1)


def random_batch(
    num_images: int, height: int, width: int, boxes_per_image: int, seed: int = 0
) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, height, width, generator=generator) * 255
    boxes = [random_boxes(boxes_per_image, height, width, generator) for _ in range(num_images)]
    classes = [
        torch.randint(NUM_CLASSES, (boxes_per_image,), generator=generator)
        for _ in range(num_images)
    ]
    return Batch(images, boxes, classes)


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(H_i, W_i) of P3-P7 for an input whose sides are multiples of 32, as the FPN makes them."""
    sizes = []
    h, w = height // 8, width // 8
    for _ in STRIDES:
        sizes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


@dataclass
class DenseOutputs:
    """Per-level head outputs in NCHW: class logits, box regressions (positive, in strides, as the
    three implementations' decoders expect them) and center-ness logits."""

    cls_logits: list[Tensor]
    box_reg: list[Tensor]
    ctrness: list[Tensor]

    def tensors(self) -> list[Tensor]:
        return [*self.cls_logits, *self.box_reg, *self.ctrness]

    def clone(self, requires_grad: bool = False) -> "DenseOutputs":
        def copy(xs):
            return [x.detach().clone().requires_grad_(requires_grad) for x in xs]

        return DenseOutputs(copy(self.cls_logits), copy(self.box_reg), copy(self.ctrness))

    def to(self, device) -> "DenseOutputs":
        def move(xs):
            return [x.to(device) for x in xs]

        return DenseOutputs(move(self.cls_logits), move(self.box_reg), move(self.ctrness))


def random_dense_outputs(
    num_images: int, height: int, width: int, seed: int = 0, device="cpu"
) -> DenseOutputs:
    """Head outputs of an untrained detector: logits near the prior, boxes of 1-4 strides."""
    generator = torch.Generator().manual_seed(seed)
    cls, box, ctr = [], [], []
    for h, w in level_sizes(height, width):
        cls.append(torch.randn(num_images, NUM_CLASSES, h, w, generator=generator) - 4.6)
        box.append(0.5 + 3.5 * torch.rand(num_images, 4, h, w, generator=generator))
        ctr.append(torch.randn(num_images, 1, h, w, generator=generator))
    return DenseOutputs(cls, box, ctr).to(device)


def candidate_dense_outputs(
    num_images: int,
    height: int,
    width: int,
    candidates_per_level: int,
    seed: int = 0,
    device="cpu",
) -> DenseOutputs:
    """Head outputs where exactly ``candidates_per_level`` (location, class) pairs per level (or all
    the level has) score well above 0.05 and every other pair far below it.

    Center-ness logits are 8 (probability ~1), so the pairs that pass are the same whichever score
    an implementation thresholds: the class probability (fcos-d2) or sqrt(class x center-ness)
    (Detectron2, torchvision); and the ranking by either score is the same.
    """
    generator = torch.Generator().manual_seed(seed)
    outputs = random_dense_outputs(num_images, height, width, seed, "cpu")
    for level, logits in enumerate(outputs.cls_logits):
        flat = logits.view(num_images, -1)
        flat.fill_(-15.0)  # probability 3e-7: sqrt(3e-7) = 5e-4 fails any threshold >= 0.001
        count = min(candidates_per_level, flat.shape[1])
        for image in range(num_images):
            chosen = torch.randperm(flat.shape[1], generator=generator)[:count]
            # Probabilities 0.12-0.98 pass a 0.05 threshold under every definition of the score.
            flat[image, chosen] = -2.0 + 6.0 * torch.rand(count, generator=generator)
        outputs.ctrness[level].fill_(8.0)
    return outputs.to(device)
