"""Logging set-up of every node process (serve, workers, router, ingress, demo).

Logs never carry patient data above DEBUG. Two libraries would break that by default:
pydicom logs and warns about invalid values with the raw value (a malformed
PatientBirthDate, a person name in the wrong VR), and apscheduler writes an INFO line for
every dispatcher tick (and a WARNING for every tick skipped while one runs long), burying
the node's own lines.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int, fmt: str = FORMAT) -> None:
    """``logging.basicConfig`` plus the library levels above; pydicom's value checks are
    silenced unless ``level`` is DEBUG (the writers repair what they take from headers)."""
    logging.basicConfig(level=level, format=fmt)
    # a tick that overruns its interval is skipped, with a WARNING each time: normal while
    # a series is routed; a tick that raises is still an ERROR
    logging.getLogger("apscheduler").setLevel(level if level <= logging.DEBUG else logging.ERROR)
    if level > logging.DEBUG:
        import pydicom.config

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
