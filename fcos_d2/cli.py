"""Command-line helpers shared by ``demo.py`` and ``python -m fcos_d2.export``."""

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _top_level_keys() -> frozenset:
    from detectron2.config import get_cfg

    from .config import add_fcos_config

    return frozenset(add_fcos_config(get_cfg()).keys())


def looks_like_config_key(item: str) -> bool:
    """``SECTION.KEY`` or a top-level key such as ``OUTPUT_DIR``, by the config's own sections."""
    first = item.split(".")[0]
    return first in _top_level_keys() and item == item.upper()


def split_config_overrides(items: list[str], opts: list[str]) -> tuple[list[str], list[str]]:
    """``--input a.jpg MODEL.WEIGHTS w.pth`` means one image and one override: argparse's
    ``nargs="+"`` would swallow the override, so the items end at the first config key that is
    not an existing path; the rest goes before ``opts``. A mistyped image name stays an image,
    and is then reported as missing."""
    for index, item in enumerate(items):
        if looks_like_config_key(item) and not Path(item).exists():
            return items[:index], items[index:] + opts
    return items, opts
