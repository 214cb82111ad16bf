"""Configuration files of the recipes in ``trainers/``: a YAML mapping of a dataclass's fields, with command-line
overrides (``--output_dir``, ``--set key=value ...``)."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def parse_set_arguments(pairs: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["key=value", ...]`` → ``{key: value}``, each value read as YAML (``7`` is an int, ``7.0`` a float, ``null``
    None, ``[1, 2]`` a list, anything else a string)."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"`{option}` takes KEY=VALUE pairs, got {pair!r}.")
        if key in overrides:
            raise ValueError(f"`{option}` sets {key!r} twice.")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"`{option} {pair}`: the value is not valid YAML ({error}).") from error
    return overrides


def load_recipe_config(path: str, config_class: type[ConfigT], overrides: dict[str, Any] | None = None) -> ConfigT:
    """Read ``path`` (a YAML mapping of ``config_class`` fields), apply ``overrides`` and build the config. Unknown
    keys raise a ``ValueError`` that names them and the closest field names."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the config must be a mapping of {config_class.__name__} fields.")
    spec.update(overrides or {})
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown config keys for {config_class.__name__}: {', '.join(hints)}.")
    return config_class(**spec)


def add_override_arguments(parser) -> None:
    """Add a recipe's ``--output_dir`` and ``--set KEY=VALUE ...`` options to an ``argparse`` parser."""
    parser.add_argument("--output_dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, each value read as YAML, e.g. --set learning_rate=1e-4 "
                             "eval_num_videos=16")


def override_arguments(cli) -> dict[str, Any]:
    """The config overrides of parsed ``--set`` and ``--output_dir`` options (``--output_dir`` wins)."""
    overrides = parse_set_arguments(cli.set)
    if cli.output_dir is not None:
        overrides["output_dir"] = cli.output_dir
    return overrides
