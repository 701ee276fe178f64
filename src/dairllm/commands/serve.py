"""`dairllm serve --model M.m --tokenizer T.t`: an OpenAI-compatible HTTP API."""
from __future__ import annotations

import argparse
from pathlib import Path

from .chat import add_session_arguments, open_session

HELP = "serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_session_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None,
                   help="model id reported by /v1/models (default: the model file's name)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="default max_tokens of a chat completion (default 256)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    try:
        from ..server import serve
    except ImportError as e:
        raise ConfigError(str(e)) from None
    session = open_session(args)
    try:
        serve(session, args.host, args.port, args.name or Path(args.model).stem, args.max_tokens)
    finally:
        session.model.close()
    return 0
