"""One exception tree for the whole node.

    CtAiNodeError
     +-- InputRejected      the input cannot be analysed; ``reason`` is one line for the admin
     +-- ModelError         weights missing, wrong hash, wrong shape
     +-- OutputError        a result object could not be built

Third-party errors are wrapped at the boundary with ``raise ... from exc`` so the
caller sees one of these with a one-line message.
"""

from __future__ import annotations


class CtAiNodeError(Exception):
    """Base of every error the node raises on purpose."""


class InputRejected(CtAiNodeError):
    """The input cannot be analysed. ``str(exc)`` is a one-line reason."""

    def __init__(self, reason: str):
        reason = " ".join(str(reason).split())  # always one line
        super().__init__(reason)
        self.reason = reason


class ModelError(CtAiNodeError):
    """Model weights are missing, corrupt or do not fit the network."""


class WeightsMissing(ModelError):
    """A weights file is absent (a pipeline without weights), as opposed to present and
    refused (wrong hash, unreadable, another network), which must never pass silently."""


class OutputError(CtAiNodeError):
    """A result object (SEG, SC, SR) could not be built."""
