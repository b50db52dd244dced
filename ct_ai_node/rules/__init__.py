"""Pure rules over series headers: which series to analyse (``selection``).

No disk, no network: the folder loader and the network node's routing call the
same functions with ``ct_ai_node.volume.series.SeriesSummary`` values.
"""

from .selection import Selection, SelectionPolicy, select_series

__all__ = ["Selection", "SelectionPolicy", "select_series"]
