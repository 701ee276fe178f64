"""`dairllm chat --model M.m --tokenizer T.t`: a multi-turn conversation in the terminal.

With input piped in (stdin not a terminal) each line is one user turn and only the replies go
to stdout, one per turn; the program ends at the end of the input:
`echo "What is the capital of France?" | dairllm chat --model x.gguf`.
"""
from __future__ import annotations

import argparse
import sys
import threading

from ..chat import Chat, GenerationConfig, Result, Session, template_for
from .options import (add_cluster_arguments, add_model_arguments, add_runtime_arguments,
                      add_sampling_arguments, add_speculative_arguments, open_draft, open_model,
                      open_tokenizer, speculative_method)

HELP = "chat with a model in the terminal (the model's own chat template, streaming replies)"


def add_session_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by chat and serve: a model, its tokenizer and template, and how to run it."""
    add_model_arguments(p)
    p.add_argument("--chat-template", default="auto", choices=["auto", "llama3", "chatml"],
                   help="auto (default): the tokenizer's own template; or a built-in one")
    add_sampling_arguments(p)
    add_runtime_arguments(p)
    add_cluster_arguments(p)            # --workers and friends: a cluster runs the model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_session_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply")
    add_speculative_arguments(p)


def open_session(args: argparse.Namespace) -> Session:
    """Model, tokenizer and template from the shared options -> a chat.Session."""
    tok = open_tokenizer(args)
    template = template_for(tok, args.chat_template)
    model = open_model(args, announce=sys.stderr)
    draft = None
    try:
        if getattr(args, "draft_model", None):
            draft = open_draft(args, model, tok)
        return Session(model, tok, template, draft=draft)
    except BaseException:
        if draft is not None:
            draft.model.close()
        model.close()
        raise


def run(args: argparse.Namespace) -> int:
    cfg = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.topp, seed=args.seed, speculative=speculative_method(args),
                           draft_tokens=args.draft_tokens)
    cfg.validate()
    session = open_session(args)
    out = sys.stdout
    try:
        chat = Chat(session, args.system)
        interactive = sys.stdin.isatty()
        if hasattr(sys.stdin, "reconfigure"):    # bytes that are not text: U+FFFD, not an error
            sys.stdin.reconfigure(errors="replace")
        if interactive:
            print("Type a message; /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
        while True:
            if interactive:
                out.write("\n> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\r\n")
            if text.strip() == "/exit":
                break
            if text.strip() == "/reset":
                chat = Chat(session, args.system)
                continue
            if not text.strip():
                continue
            res = Result()
            cancel = threading.Event()
            try:
                for piece in chat.send(text, cfg, result=res, cancel=cancel):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:       # Ctrl-C stops the reply, not the chat
                cancel.set()
                out.write(" [stopped]")
            out.write("\n")
            out.flush()
            spec = res.stats.speculative if res.stats is not None else None
            print(f"[{res.prompt_tokens} prompt tokens ({res.cached_tokens} cached), "
                  f"{res.completion_tokens} generated, {res.finish_reason}"
                  f"{'; ' + spec.summary() if spec is not None else ''}]", file=sys.stderr)
    finally:
        if session.draft is not None:
            session.draft.model.close()
        session.model.close()
    return 0
