"""When a received series is complete: pure timing rule, no clock of its own.

DICOM has no "end of series" message. A series counts as complete when no new
instance arrived for ``quiet_time_s``. The release of the association that
delivered the last instance is a strong hint that the sender is done, so after
a release the node waits only ``min(quiet_time_s, release_wait_s)`` - measured
from the release - in case the sender opens another association for the rest
of the series (some PACS send one association per batch of instances). The
caller picks the release wait: shorter when the whole series came in the
released association (``whole_series``), since a sender that splits a series
over associations opens the next one within milliseconds.

Times are seconds on one clock (e.g. ``time.time()``); the caller passes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: fewer instances than this in one association are no sign of a whole series (a modality
#: that sends one association per image has sent "all" of the series after its first one)
WHOLE_SERIES_MIN_INSTANCES = 10


def whole_series(instance_count: int, carried: int | None) -> bool:
    """True when the released association carried every instance the series has (``carried``
    distinct ones; None: unknown, or another association was storing into it at the same
    time), and enough of them to be a series rather than its start."""
    return carried is not None and carried >= instance_count >= WHOLE_SERIES_MIN_INSTANCES


@dataclass(frozen=True)
class ReadyCheck:
    """Whether a series is complete, why, and from when on it will be if nothing arrives."""

    ready: bool
    #: one line, no patient data: ``quiet for 20.0 s (>= 20 s)``
    reason: str
    #: the earliest time the series is ready if no further instance arrives
    ready_at: float


def _check_seconds(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_ready(
    last_instance_at: float, released_at: float | None, now: float, quiet_time_s: float, release_wait_s: float,
) -> ReadyCheck:
    """Completeness verdict with its reason (see ``series_ready``).

    Raises
    ------
    ValueError
        If ``quiet_time_s`` or ``release_wait_s`` is negative or not a number.
    """
    _check_seconds("quiet_time_s", quiet_time_s)
    _check_seconds("release_wait_s", release_wait_s)
    quiet_at = last_instance_at + quiet_time_s
    # a release before the last instance belongs to an earlier association: no hint
    hinted = released_at is not None and released_at >= last_instance_at
    release_wait = min(quiet_time_s, release_wait_s)
    ready_at = min(quiet_at, released_at + release_wait) if hinted else quiet_at
    quiet = now - last_instance_at
    if now >= quiet_at:
        return ReadyCheck(True, f"quiet for {quiet:.1f} s (>= {quiet_time_s:g} s)", ready_at)
    if hinted and now >= released_at + release_wait:
        return ReadyCheck(True, f"association released {now - released_at:.1f} s ago "
                                f"(>= {release_wait:g} s)", ready_at)
    if hinted:
        return ReadyCheck(False, f"association released {now - released_at:.1f} s ago, "
                                 f"waiting {release_wait:g} s", ready_at)
    return ReadyCheck(False, f"last instance {quiet:.1f} s ago, waiting {quiet_time_s:g} s", ready_at)


def series_ready(last_instance_at: float, released_at: float | None, now: float, quiet_time_s: float,
                 release_wait_s: float) -> bool:
    """True when the series is complete.

    Ready when ``now - last_instance_at >= quiet_time_s``, or when the
    association was released at or after the last instance and
    ``now - released_at >= min(quiet_time_s, release_wait_s)``.
    """
    return check_ready(last_instance_at, released_at, now, quiet_time_s, release_wait_s).ready


__all__ = ["WHOLE_SERIES_MIN_INSTANCES", "ReadyCheck", "check_ready", "series_ready", "whole_series"]
