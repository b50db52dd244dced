"""The egress contract: a ``Destination`` sends files and returns a ``SendReport``, or
raises ``DestinationError`` whose ``retryable`` tells the job queue whether to try again.

Re-sends are idempotent by construction: files go out unchanged, with their own SOP
Instance UIDs, so a peer that already has an instance keeps one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ct_ai_node.errors import CtAiNodeError


class DestinationError(CtAiNodeError):
    """Sending failed. ``str(exc)`` is one line for the admin (no patient data);
    ``retryable`` is True when the same send may succeed later (peer down, busy,
    out of resources, reply lost) and False when it cannot without a change of
    configuration or data (unknown AE title, SOP class refused, bad data, 4xx)."""

    def __init__(self, message: str, *, retryable: bool, destination: str = ""):
        message = " ".join(str(message).split())
        if destination:
            message = f"{destination}: {message}"
        super().__init__(message)
        self.retryable = retryable
        self.destination = destination


@dataclass(frozen=True, kw_only=True)
class SendReport:
    sent: int  #: instances the peer accepted (stored now)
    seconds: float
    already_present: int = 0  #: instances the peer said it already had (a re-send)
    warnings: int = 0  #: accepted with a warning status (e.g. 0xB000 coercion)
    bytes_sent: int = 0
    destination: str = ""

    @property
    def total(self) -> int:
        return self.sent + self.already_present


#: failure statuses that describe the peer's state, not our data (see classify_status)
_RETRYABLE_STATUSES = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})


def classify_status(status: int) -> str:
    """``ok``, ``warning``, ``already``, ``retry`` or ``fatal`` for a DICOM storage status
    (C-STORE status, or a STOW-RS FailureReason / WarningReason).

    Retryable: 0xA7xx out of resources, 0x0110 processing failure, 0x0210 duplicate
    invocation, 0x0213 resource limitation, 0xFE00 cancel. Fatal: 0xA9xx data set does
    not match SOP class, 0xCxxx cannot understand, and any other failure - the same
    bytes would fail the same way. 0x0111 duplicate SOP instance: already present."""
    if status == 0x0000:
        return "ok"
    if status == 0x0111:
        return "already"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xA700 <= status <= 0xA7FF or status in _RETRYABLE_STATUSES:
        return "retry"
    return "fatal"


@runtime_checkable
class Destination(Protocol):
    name: str

    def send(self, paths: list[Path]) -> SendReport:
        """Send every file in ``paths``; all or raise ``DestinationError``."""
        ...
