"""When a received series is complete: pure timing rule, no clock of its own.

DICOM has no "end of series" message. A series counts as complete when no new
instance arrived for ``quiet_time_s``. The release of the association that
delivered the last instance is a strong hint that the sender is done, so after
a release the node waits only ``min(quiet_time_s, RELEASE_WAIT_S)`` - measured
from the release - in case the sender opens another association for the rest
of the series (some PACS send one association per batch of instances).

Times are seconds on one clock (e.g. ``time.time()``); the caller passes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the wait after an association release (seconds), when shorter than the quiet time
RELEASE_WAIT_S = 2.0


@dataclass(frozen=True)
class ReadyCheck:
    """Whether a series is complete, why, and from when on it will be if nothing arrives."""

    ready: bool
    #: one line, no patient data: ``quiet for 20.0 s (>= 20 s)``
    reason: str
    #: the earliest time the series is ready if no further instance arrives
    ready_at: float


def check_ready(
    last_instance_at: float, released_at: float | None, now: float, quiet_time_s: float
) -> ReadyCheck:
    """Completeness verdict with its reason (see ``series_ready``).

    Raises
    ------
    ValueError
        If ``quiet_time_s`` is negative or not a number.
    """
    if not (isinstance(quiet_time_s, (int, float)) and math.isfinite(quiet_time_s) and quiet_time_s >= 0):
        raise ValueError(f"quiet_time_s must be a number >= 0, got {quiet_time_s!r}")
    quiet_at = last_instance_at + quiet_time_s
    # a release before the last instance belongs to an earlier association: no hint
    hinted = released_at is not None and released_at >= last_instance_at
    release_wait = min(quiet_time_s, RELEASE_WAIT_S)
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


def series_ready(last_instance_at: float, released_at: float | None, now: float, quiet_time_s: float) -> bool:
    """True when the series is complete.

    Ready when ``now - last_instance_at >= quiet_time_s``, or when the
    association was released at or after the last instance and
    ``now - released_at >= min(quiet_time_s, RELEASE_WAIT_S)``.
    """
    return check_ready(last_instance_at, released_at, now, quiet_time_s).ready


__all__ = ["RELEASE_WAIT_S", "ReadyCheck", "check_ready", "series_ready"]
