"""The exceptions dairllm raises. Every error a user can cause derives from DairError."""
from __future__ import annotations


class DairError(Exception):
    """Base of every dairllm error; the CLI prints its message on one line and exits non-zero."""


class ModelFormatError(DairError, ValueError):
    """A .m model file is malformed, truncated or unsupported."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class TokenizerFormatError(DairError, ValueError):
    """A .t tokenizer file is malformed, truncated or unsupported."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ProtocolError(DairError):
    """A network peer sent something that breaks the protocol."""


class ConfigError(DairError, ValueError):
    """Arguments or settings that cannot work together."""


class IntegrityError(DairError):
    """A node's weights or activations are not what they must be: a layer whose bytes differ
    from the root's, non-finite activations or logits. A cluster root treats the node as unusable
    (cluster/integrity.py); a single node stops with this error."""
