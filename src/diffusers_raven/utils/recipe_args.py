"""How the scripts in ``trainers/`` read their configuration: as TRL's scripts do, with ``trl.TrlParser``.

``--config file.yaml`` sets fields of the script's dataclasses (its own arguments and the trainer's or recipe's
config), any field is also a flag (``--learning_rate 1e-5``, lists as ``--modes raven self_forcing``, booleans as
``--compile`` or ``--compile false``), and flags win over the file. On top of ``TrlParser``:

- a key of the file or a flag that is no field fails with one ``ValueError`` naming it and the closest field
  (argparse's prefix matching is off, so ``--learning`` does not silently mean ``--learning_rate``);
- a flag of an optional field takes ``null`` for ``None``, as the YAML file does (only ``null``: argparse also
  converts string defaults, such as ``TrainingArguments.report_to``'s ``"none"``).
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

__all__ = ["NULL_STRINGS", "parse_recipe_args"]

#: Flag values read as ``None`` for optional fields.
NULL_STRINGS = ("null",)


def _optional_fields(dataclass_types: Sequence[type]) -> set[str]:
    """Names of the fields whose type admits ``None``."""
    names = set()
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for f in fields(dataclass_type):
            hint = hints.get(f.name, f.type)
            origin = typing.get_origin(hint)
            if (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(hint):
                names.add(f.name)
    return names


def _or_null(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text in NULL_STRINGS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error messages
    return parse


def _hints(keys: list[str], known: list[str]) -> str:
    """``'key' (did you mean 'kee'?), ...``."""
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, description: str | None = None
) -> tuple:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into instances of ``dataclass_types``, in order, with
    ``trl.TrlParser`` (``--config`` YAML plus flags). Unknown keys and flags raise a ``ValueError`` naming them."""
    from trl import TrlParser

    parser = TrlParser(
        dataclass_types, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    optional = _optional_fields(dataclass_types)
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _or_null(action.type)
    *parsed, from_file, from_flags = parser.parse_args_and_config(
        list(argv) if argv is not None else None, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_file or from_flags:
        names = [f.name for t in dataclass_types for f in fields(t)]
        problems = []
        if from_file:  # ["--key", "value", ...] from the YAML mapping
            problems.append(f"unknown keys in the --config file: {_hints([k[2:] for k in from_file[::2]], names)}")
        if from_flags:
            flags = [s.split("=", 1)[0] for s in from_flags if s.startswith("--")] or from_flags
            problems.append(f"unknown arguments: {_hints(flags, [f'--{n}' for n in names])}")
        classes = ", ".join(t.__name__ for t in dataclass_types)
        raise ValueError("; ".join(problems) + f" (the fields of {classes}; `--help` lists them).")
    return tuple(parsed)
