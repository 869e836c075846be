"""The package's one dependency rule (README, "Layout"), read from the source of every module.

Layers, bottom to top; a module may import its own unit and the units of lower layers, never a
unit beside it or above it:

0. foundation: checks, utils, d2_compat, precision
1. config | formats
2. modeling | data | evaluation
3. checkpoint
4. inference | export (the library) | analysis (the library)
5. engine | cli
6. entry points: ``python -m fcos_d2.{export,analysis,convert}``, train_net.py,
   lazyconfig_train_net.py, demo.py, benchmarks/, configs/LazyConfig/ (each its own unit)

Every private name of Detectron2, fvcore, torch and torchvision that fcos_d2 uses goes through
``fcos_d2/d2_compat.py``; the benchmarks are exempt, as they time the peers' internal steps.
"""

import ast
from pathlib import Path

import pytest
from helpers import REPO

LAYERS: list[list[str]] = [
    ["fcos_d2.checks|fcos_d2.utils|fcos_d2.d2_compat|fcos_d2.precision"],
    ["fcos_d2.config", "fcos_d2.formats"],
    ["fcos_d2.modeling", "fcos_d2.data", "fcos_d2.evaluation"],
    ["fcos_d2.checkpoint"],
    ["fcos_d2.inference", "fcos_d2.export", "fcos_d2.analysis"],
    ["fcos_d2.engine", "fcos_d2.cli"],
]
ENTRY_POINTS = ("fcos_d2.export.__main__", "fcos_d2.analysis.__main__", "fcos_d2.convert")
FACADE = "fcos_d2"  # fcos_d2/__init__.py: imports config and modeling, imported by no layer
PRIVATE_ROOTS = ("torch", "torchvision", "detectron2", "fvcore")
D2_COMPAT = "fcos_d2.d2_compat"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> list[Path]:
    files = sorted((REPO / "fcos_d2").rglob("*.py"))
    files += sorted(REPO.glob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    return files + sorted((REPO / "configs").rglob("*.py"))


def unit_of(module: str) -> tuple[int, str]:
    """(layer, unit) of a module; entry points are the top layer, each its own unit."""
    if module.startswith(ENTRY_POINTS) or not module.startswith("fcos_d2"):
        top = module.split(".")[0] if module.startswith(("benchmarks", "configs")) else module
        return len(LAYERS), top
    if module == FACADE:
        return 2.5, FACADE  # above config and modeling, which it exports; no layer imports it
    for layer, units in enumerate(LAYERS):
        for unit in units:
            if any(module == u or module.startswith(u + ".") for u in unit.split("|")):
                return layer, unit
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every fcos_d2 import in the file (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import runtime" imports a module; "from .x import name" imports from x.
            names = [f"{prefix}.{a.name}" if not node.module else prefix for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] == "fcos_d2"]
    return found


def layer_violations() -> list[str]:
    violations = []
    for path in sources():
        module = module_name(path)
        layer, unit = unit_of(module)
        for line, imported in imported_modules(path, module):
            their_layer, their_unit = unit_of(imported)
            if their_unit == FACADE and unit != FACADE and layer < len(LAYERS):
                ok = False
            else:
                ok = their_unit == unit or their_layer < layer
            if not ok:
                violations.append(
                    f"{path.relative_to(REPO)}:{line}: {unit} (layer {layer}) imports "
                    f"{imported} ({their_unit}, layer {their_layer})"
                )
    return violations


def test_every_import_goes_down_the_layers():
    assert layer_violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    # The check itself: an import from a higher layer and one from beside are both reported.
    upward = ast.parse("from ..engine import Trainer\nfrom ..data import shapes\n")
    package = "fcos_d2.modeling"
    bad = []
    for node in upward.body:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + [node.module])
        their_layer, their_unit = unit_of(target)
        layer, unit = unit_of("fcos_d2.modeling.fcos")
        if not (their_unit == unit or their_layer < layer):
            bad.append(target)
    assert bad == ["fcos_d2.engine", "fcos_d2.data"]


def private_names(path: Path) -> list[str]:
    """Private names (``_x``, not dunders) of torch, torchvision, Detectron2 or fvcore used in a
    file: imported from such a module, or reached as an attribute of one."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> module it stands for
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in PRIVATE_ROOTS:
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    if private(alias.name) or any(private(p) for p in node.module.split(".")):
                        found.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and aliases.get(base.id, "").split(".")[0] in (
                PRIVATE_ROOTS
            ):
                found.append(f"{path.name}:{node.lineno}: {base.id}....{node.attr}")
    return found


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in sources()
        if module_name(p) != D2_COMPAT and not module_name(p).startswith("bench")
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_private_names_of_other_libraries_only_in_d2_compat(path):
    assert private_names(path) == []


def test_the_private_name_check_finds_them(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom detectron2.data.detection_utils import _apply_exif_orientation\n"
        "torch._foreach_lerp_([], [], 0.5)\ntorch.cpu._is_avx512_bf16_supported()\n"
    )
    assert len(private_names(sample)) == 3
    assert private_names(REPO / "fcos_d2" / "d2_compat.py")  # where they are allowed
