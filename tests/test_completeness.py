"""Series completeness: quiet time, the shorter wait after an association release, boundaries."""

from __future__ import annotations

import math

import pytest

from ct_ai_node.rules.completeness import RELEASE_WAIT_S, check_ready, series_ready

T0 = 1_700_000_000.0  # a time.time() value: the rule must not care about the epoch


@pytest.mark.parametrize("elapsed,ready", [
    (0.0, False),
    (19.999, False),
    (20.0, True),  # boundary: exactly the quiet time is enough
    (20.001, True),
    (3600.0, True),
])
def test_quiet_time_without_release(elapsed, ready):
    assert series_ready(T0, None, T0 + elapsed, 20.0) is ready


@pytest.mark.parametrize("release_after,elapsed,ready", [
    (0.5, 0.5, False),   # released just now
    (0.5, 2.499, False),  # 1.999 s after the release
    (0.5, 2.5, True),    # boundary: RELEASE_WAIT_S after the release
    (0.0, 2.0, True),    # released together with the last instance
    (0.0, 1.999, False),
    (30.0, 20.0, True),  # held open, released late: the quiet time still counts
])
def test_release_shortens_the_wait(release_after, elapsed, ready):
    assert RELEASE_WAIT_S == 2.0
    assert series_ready(T0, T0 + release_after, T0 + elapsed, 20.0) is ready


def test_release_before_last_instance_is_no_hint():
    # an earlier association was released, then more instances came on another one
    assert not series_ready(T0, T0 - 1.0, T0 + 5.0, 20.0)
    assert series_ready(T0, T0 - 1.0, T0 + 20.0, 20.0)


@pytest.mark.parametrize("elapsed,ready", [(0.999, False), (1.0, True)])
def test_quiet_time_shorter_than_release_wait(elapsed, ready):
    # min(quiet_time_s, 2 s): a 1 s quiet time is never lengthened by a release
    assert series_ready(T0, T0, T0 + elapsed, 1.0) is ready
    assert series_ready(T0, None, T0 + elapsed, 1.0) is ready


def test_clock_before_last_instance_is_not_ready():
    assert not series_ready(T0, None, T0 - 5.0, 20.0)
    assert not series_ready(T0, T0, T0 - 5.0, 20.0)


def test_zero_quiet_time_is_ready_at_once():
    assert series_ready(T0, None, T0, 0.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_quiet_time(bad):
    with pytest.raises(ValueError, match="quiet_time_s"):
        series_ready(T0, None, T0, bad)


def test_check_ready_reason_and_ready_at():
    waiting = check_ready(T0, None, T0 + 5.0, 20.0)
    assert not waiting.ready and waiting.ready_at == T0 + 20.0
    assert waiting.reason == "last instance 5.0 s ago, waiting 20 s"
    released = check_ready(T0, T0 + 1.0, T0 + 2.0, 20.0)
    assert not released.ready and released.ready_at == T0 + 3.0
    assert released.reason == "association released 1.0 s ago, waiting 2 s"
    done = check_ready(T0, T0 + 1.0, T0 + 3.0, 20.0)
    assert done.ready and done.reason == "association released 2.0 s ago (>= 2 s)"
    quiet = check_ready(T0, None, T0 + 25.0, 20.0)
    assert quiet.ready and quiet.reason == "quiet for 25.0 s (>= 20 s)"
    # released late: the quiet time comes first
    assert check_ready(T0, T0 + 19.0, T0 + 5.0, 20.0).ready_at == T0 + 20.0
