"""Logging set-up of every node process (serve, workers, router, ingress, demo).

Logs never carry patient data above DEBUG. Two libraries would break that by default:
pydicom logs and warns about invalid values with the raw value (a malformed
PatientBirthDate, a person name in the wrong VR), and apscheduler writes an INFO line for
every dispatcher tick, burying the node's own lines.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int, fmt: str = FORMAT) -> None:
    """``logging.basicConfig`` plus the library levels above; pydicom's value checks are
    silenced unless ``level`` is DEBUG (the writers repair what they take from headers)."""
    logging.basicConfig(level=level, format=fmt)
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))
    if level > logging.DEBUG:
        import pydicom.config

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
