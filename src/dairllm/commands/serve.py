"""`dairllm serve --model M.m --tokenizer T.t`: an OpenAI-compatible HTTP API."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .chat import add_session_arguments, open_session

HELP = "serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)"
API_KEY_ENV = "DAIRLLM_API_KEY"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_session_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None,
                   help="model id reported by /v1/models (default: the model file's name)")
    p.add_argument("--parallel-requests", type=int, default=None,
                   help="requests decoded together in one batch, each with a KV cache of "
                        "--max-seq-len positions (default: as many as RAM holds, up to 8; "
                        "with --workers: that many pipeline lanes, default one)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="default max_tokens of a chat completion (default 256)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every endpoint (default: "
                        f"${API_KEY_ENV}; prefer the variable: other users can read argv)")
    p.add_argument("--max-queue", type=_count, default=16, metavar="N",
                   help="requests that may wait beyond those generating; more get 429 "
                        "(default 16)")
    p.add_argument("--request-timeout", type=_positive_float, default=600.0, metavar="S",
                   help="seconds a request may take from arrival to its last token (default 600)")
    p.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body accepted (default 4 MiB)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    try:
        from ..server import MAX_BODY, ServeLimits, serve
    except ImportError as e:
        raise ConfigError(str(e)) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        limits = ServeLimits(api_key=api_key, max_queue=args.max_queue,
                             request_timeout=args.request_timeout,
                             max_body=args.max_body or MAX_BODY)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    session = open_session(args)
    try:
        serve(session, args.host, args.port, args.name or Path(args.model).stem, args.max_tokens,
              limits)
    finally:
        session.model.close()
    return 0
