"""The environment the project stands on: detectron2 imports and fcos_d2 registers with it."""


def test_detectron2_imports_and_registers_fcos():
    import detectron2
    from detectron2.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        PROPOSAL_GENERATOR_REGISTRY,
    )

    import fcos_d2  # noqa: F401  (registers on import)

    assert detectron2.__version__
    assert META_ARCH_REGISTRY.get("FCOS").__name__ == "FCOS"
    assert PROPOSAL_GENERATOR_REGISTRY.get("FCOS") is not None  # a builder function named FCOS
    assert BACKBONE_REGISTRY.get("build_fcos_resnet_fpn_backbone") is not None
