"""Series completeness: quiet time, the shorter wait after an association release (shorter
still when the association carried the whole series), boundaries."""

from __future__ import annotations

import math

import pytest

from ct_ai_node.config import CompletenessSection
from ct_ai_node.rules.completeness import WHOLE_SERIES_MIN_INSTANCES, check_ready, series_ready, whole_series

T0 = 1_700_000_000.0  # a time.time() value: the rule must not care about the epoch
WAIT = CompletenessSection().release_wait_s  # the default release wait, 2 s


@pytest.mark.parametrize("elapsed,ready", [
    (0.0, False),
    (19.999, False),
    (20.0, True),  # boundary: exactly the quiet time is enough
    (20.001, True),
    (3600.0, True),
])
def test_quiet_time_without_release(elapsed, ready):
    assert series_ready(T0, None, T0 + elapsed, 20.0, WAIT) is ready


@pytest.mark.parametrize("release_after,elapsed,ready", [
    (0.5, 0.5, False),   # released just now
    (0.5, 2.499, False),  # 1.999 s after the release
    (0.5, 2.5, True),    # boundary: the release wait after the release
    (0.0, 2.0, True),    # released together with the last instance
    (0.0, 1.999, False),
    (30.0, 20.0, True),  # held open, released late: the quiet time still counts
])
def test_release_shortens_the_wait(release_after, elapsed, ready):
    assert WAIT == 2.0
    assert series_ready(T0, T0 + release_after, T0 + elapsed, 20.0, WAIT) is ready


def test_release_before_last_instance_is_no_hint():
    # an earlier association was released, then more instances came on another one
    assert not series_ready(T0, T0 - 1.0, T0 + 5.0, 20.0, WAIT)
    assert series_ready(T0, T0 - 1.0, T0 + 20.0, 20.0, WAIT)


@pytest.mark.parametrize("elapsed,ready", [(0.999, False), (1.0, True)])
def test_quiet_time_shorter_than_release_wait(elapsed, ready):
    # min(quiet_time_s, 2 s): a 1 s quiet time is never lengthened by a release
    assert series_ready(T0, T0, T0 + elapsed, 1.0, WAIT) is ready
    assert series_ready(T0, None, T0 + elapsed, 1.0, WAIT) is ready


def test_clock_before_last_instance_is_not_ready():
    assert not series_ready(T0, None, T0 - 5.0, 20.0, WAIT)
    assert not series_ready(T0, T0, T0 - 5.0, 20.0, WAIT)


def test_zero_quiet_time_is_ready_at_once():
    assert series_ready(T0, None, T0, 0.0, WAIT)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_quiet_time(bad):
    with pytest.raises(ValueError, match="quiet_time_s"):
        series_ready(T0, None, T0, bad, WAIT)


def test_check_ready_reason_and_ready_at():
    waiting = check_ready(T0, None, T0 + 5.0, 20.0, WAIT)
    assert not waiting.ready and waiting.ready_at == T0 + 20.0
    assert waiting.reason == "last instance 5.0 s ago, waiting 20 s"
    released = check_ready(T0, T0 + 1.0, T0 + 2.0, 20.0, WAIT)
    assert not released.ready and released.ready_at == T0 + 3.0
    assert released.reason == "association released 1.0 s ago, waiting 2 s"
    done = check_ready(T0, T0 + 1.0, T0 + 3.0, 20.0, WAIT)
    assert done.ready and done.reason == "association released 2.0 s ago (>= 2 s)"
    quiet = check_ready(T0, None, T0 + 25.0, 20.0, WAIT)
    assert quiet.ready and quiet.reason == "quiet for 25.0 s (>= 20 s)"
    # released late: the quiet time comes first
    assert check_ready(T0, T0 + 19.0, T0 + 5.0, 20.0, WAIT).ready_at == T0 + 20.0


def test_shorter_wait_when_the_whole_series_came_in_the_released_association():
    c = CompletenessSection()
    assert (c.release_wait(False), c.release_wait(True)) == (2.0, 0.5)
    assert not series_ready(T0, T0, T0 + 0.499, 20.0, c.release_wait(True))
    assert series_ready(T0, T0, T0 + 0.5, 20.0, c.release_wait(True))
    assert not series_ready(T0, T0, T0 + 0.5, 20.0, c.release_wait(False))
    with pytest.raises(ValueError, match="release_wait_s"):
        series_ready(T0, T0, T0, 20.0, -1.0)


@pytest.mark.parametrize("count,carried,whole", [
    (300, 300, True),    # every instance in the released association
    (300, 299, False),   # one came in another association
    (300, None, False),  # another association stored into it at the same time, or unknown
    (300, 301, True),    # carried more than counted: a re-sent instance replaced, still whole
    (WHOLE_SERIES_MIN_INSTANCES - 1, WHOLE_SERIES_MIN_INSTANCES - 1, False),  # one image per association
    (WHOLE_SERIES_MIN_INSTANCES, WHOLE_SERIES_MIN_INSTANCES, True),
])
def test_whole_series(count, carried, whole):
    assert whole_series(count, carried) is whole
