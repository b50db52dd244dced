"""Pure rules over series headers: no disk, no network.

- ``selection``: which series of a folder to analyse (``select_series``);
- ``routing``: what the node does with a received series (``route``);
- ``completeness``: when a received series is complete (``series_ready``).

The folder loader and the network node call the same functions.
"""

from .completeness import ReadyCheck, check_ready, series_ready
from .routing import RoutedAction, RoutingDecision, SeriesFacts, facts_from_datasets, route
from .selection import Selection, SelectionPolicy, select_series

__all__ = [
    "ReadyCheck",
    "RoutedAction",
    "RoutingDecision",
    "Selection",
    "SelectionPolicy",
    "SeriesFacts",
    "check_ready",
    "facts_from_datasets",
    "route",
    "select_series",
    "series_ready",
]
