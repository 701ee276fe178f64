"""`python -m dairllm COMMAND`: one module per command under dairllm/commands/.

Each command module defines HELP (one line), `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import DairError

# Order shown in --help. Each name is a module in dairllm.commands.
COMMANDS = ["inspect", "make_model", "generate", "bench", "convert", "convert_tokenizer", "worker",
            "chat", "serve", "plan", "demo"]


def _command_name(module: str) -> str:
    return module.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dairllm",
        description="Run LLMs on clusters of ordinary computers: every node maps the model from "
                    "its own disk, only activations cross the network.")
    parser.add_argument("--version", action="version", version=_version_text())
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f".commands.{module_name}", __package__)
        p = sub.add_parser(_command_name(module_name), help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def _version_text() -> str:
    try:
        from . import build_info
        info = build_info()
        extras = ", ".join(f"{k}={v}" for k, v in info.items())
        return f"dairllm {__version__} ({extras})" if extras else f"dairllm {__version__}"
    except ImportError as e:  # the extension is not built
        return f"dairllm {__version__} (kernels not built: {e})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except DairError as e:
        print(f"dairllm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dairllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a traceback
        sys.stderr.close()
        return 0
