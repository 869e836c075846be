"""LazyConfig files for the LazyConfig trainer: loaded with ``key=value`` overrides that are
checked as yacs checks its keys (an unknown key, a number that is not one), with errors that name
the file or the override."""

import inspect
from typing import Any

from detectron2.config import LazyConfig
from omegaconf import DictConfig, OmegaConf

from ..checks import ConfigError, check_that


def load_lazy_config(config_file: str, opts: list[str]) -> DictConfig:
    """The LazyConfig file with ``key=value`` overrides; a missing file, a syntax error, a bad
    override or an unknown key is a :class:`ConfigError` naming it."""
    try:
        cfg = LazyConfig.load(config_file)
    except FileNotFoundError:
        raise ConfigError(f"config file {config_file} does not exist") from None
    except SyntaxError as error:
        raise ConfigError(f"in {config_file}: {error}") from None
    keys = []
    for override in opts:
        if "=" not in override:
            raise ConfigError(
                f"in the command-line overrides: {override!r} is not key=value: LazyConfig "
                "overrides are key=value, e.g. train.init_checkpoint=path/model.pth (KEY VALUE "
                "pairs such as MODEL.WEIGHTS path are for the yacs configs of train_net.py)"
            )
        keys.append(override.split("=", 1)[0].lstrip("+~"))
        check_override_key(cfg, keys[-1], config_file)
    defaults = {key: _value(cfg, key) for key in keys}
    try:
        cfg = LazyConfig.apply_overrides(cfg, opts)
    except Exception as error:  # hydra and omegaconf raise many types for one bad override
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"in the command-line overrides {list(opts)}: {detail} (LazyConfig overrides are "
            "key=value, e.g. train.max_iter=100 train.init_checkpoint=path/model.pth)"
        ) from None
    for key, default in defaults.items():
        check_override_type(key, default, _value(cfg, key))
    return cfg


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)


_KINDS = {bool: "a boolean", int: "an integer", float: "a number"}


def check_override_type(key: str, default: Any, value: Any) -> None:
    """A number or a boolean stays one, as yacs requires ("Type mismatch"): ``train.max_iter=many``
    is an error here rather than inside the trainer."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) == isinstance(value, bool) or default is None
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    else:
        return
    check_that(
        ok,
        key,
        f"{_KINDS[type(default)]} like its default {default!r}",
        value,
        "command-line override",
    )


def check_override_key(cfg: DictConfig, key: str, config_file: str) -> None:
    """``key`` must exist in ``cfg``, or name an argument of the object its parent builds (a
    ``LazyCall`` may set any argument of its target): a mistyped key is an error, as in yacs,
    instead of a new entry nobody reads."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # a list or a value: omegaconf reports what it cannot set
        if part in node:
            node = node[part]
            continue
        target = node.get("_target_") if depth else None
        if target is not None and _accepts_argument(target, part):
            return
        where = ".".join(parts[:depth]) or "the top level"
        raise ConfigError(
            f"in the command-line overrides: {key} is not a key of {config_file} (keys of "
            f"{where}: {sorted(k for k in node.keys() if k != '_target_')})"
        )


def _accepts_argument(target: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature (a builtin, a string target): allow
        return True
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
