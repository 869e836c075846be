"""AdelaiDet's meta-architecture name, registered only to explain what to write instead.

AdelaiDet's FCOS YAML files say ``META_ARCHITECTURE: "OneStageDetector"`` (a Detectron2
``ProposalNetwork`` whose proposal generator ``FCOS`` is the whole detector). fcos_d2's detector is
the meta-architecture ``FCOS`` itself.
"""

from detectron2.modeling import META_ARCH_REGISTRY

MESSAGE = (
    'MODEL.META_ARCHITECTURE "OneStageDetector" is AdelaiDet\'s name for FCOS; with fcos_d2 set '
    'MODEL.META_ARCHITECTURE: "FCOS" and drop MODEL.PROPOSAL_GENERATOR.NAME: "FCOS" (the FCOS '
    "meta-architecture ignores it; under Detectron2's ProposalNetwork or GeneralizedRCNN it "
    "selects fcos_d2's class-agnostic FCOS proposal generator, which makes proposals, not "
    "detections). The other keys of the authors' FCOS YAML files carry over."
)


def OneStageDetector(cfg):  # named as the authors' class: the registry keys on __name__
    raise ValueError(MESSAGE)


# Someone may import AdelaiDet in the same process: its own class then keeps the name.
if "OneStageDetector" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(OneStageDetector)
