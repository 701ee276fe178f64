"""Render a conversation into the prompt text a model was trained on.

A tokenizer that carries a Jinja chat template (Hugging Face's `chat_template`) is rendered with
jinja2 in a sandbox, with the helpers transformers provides (`raise_exception`, `strftime_now`,
`bos_token`, `eos_token`, `add_generation_prompt`). Without one, two templates are built in:
llama3 and chatml. `ChatTemplate.named("llama3")` picks a built-in explicitly.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN = {"llama3": LLAMA3, "chatml": CHATML}

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ConfigError):
    """The chat template cannot be compiled or rendered for these messages."""


def detect_builtin(template: str | None) -> str | None:
    """Which built-in family a template text belongs to (the substrings distributed-llama
    uses to detect its own templates), or None."""
    if not template:
        return None
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def _raise(message: str):
    raise TemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    source: str
    name: str                       # "tokenizer", "llama3", "chatml"
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError("chat templates need jinja2: pip install 'dairllm[chat]'") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the {self.name} chat template does not compile: {e}") from None

    @classmethod
    def named(cls, name: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        if name not in BUILTIN:
            raise ConfigError(f"unknown chat template {name!r}; built in: {', '.join(BUILTIN)}")
        return cls(BUILTIN[name], name, bos_token, eos_token)

    @classmethod
    def choose(cls, tokenizer_template: str | None, override: str | None = None,
               bos_token: str = "", eos_token: str = "",
               special_tokens: Sequence[str] = ()) -> "ChatTemplate":
        """The tokenizer's own template unless `override` names a built-in ("auto" or None
        keeps the tokenizer's). Without one, a built-in whose markers are among the
        tokenizer's special tokens; else fail clearly."""
        if override and override != "auto":
            return cls.named(override, bos_token, eos_token)
        if tokenizer_template:
            return cls(tokenizer_template, "tokenizer", bos_token, eos_token)
        specials = set(special_tokens)
        for name, markers in (("llama3", ("<|start_header_id|>", "<|eot_id|>")),
                              ("chatml", ("<|im_start|>", "<|im_end|>"))):
            if specials.issuperset(markers):
                return cls.named(name, bos_token, eos_token)
        raise ConfigError("the tokenizer carries no chat template; pick one with "
                          f"--chat-template ({', '.join(BUILTIN)})")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               **extra) -> str:
        check_messages(messages)
        import jinja2
        try:
            return self._template.render(messages=list(messages), bos_token=self.bos_token,
                                         eos_token=self.eos_token,
                                         add_generation_prompt=add_generation_prompt, **extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the {self.name} chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"the {self.name} chat template failed on these messages: "
                                f"{type(e).__name__}: {e}") from None


def check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


def _tojson(value, indent=None, **kw) -> str:
    import json
    return json.dumps(value, indent=indent, ensure_ascii=False)
