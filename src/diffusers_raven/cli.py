"""The ``diffusers-raven`` command.

Sub-commands register themselves through small ``add_<name>_parser`` functions so that each part of the package
owns its own arguments; ``main`` only dispatches.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
diffusers-raven: streaming autoregressive video diffusion.

  diffusers-raven generate "a red circle moving right"   write a video (raven.mp4) with the default model, the
                                                          ShapesWorld model shipped with the package
  diffusers-raven eval --output metrics.json              ShapesWorld metrics of a model (JSON)
  diffusers-raven convert --checkpoint model.pt --output out/
                                                          turn a Self Forcing / LongLive / CausVid checkpoint into
                                                          a diffusers folder

Run `diffusers-raven <command> --help` for the options of a command.
"""


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from .cli_eval import add_eval_parser
    from .cli_generate import add_generate_parser
    from .convert import add_convert_parser

    parser = argparse.ArgumentParser(
        prog="diffusers-raven", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_convert_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"diffusers-raven {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
