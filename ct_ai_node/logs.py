"""Logging set-up of every node process (serve, workers, router, ingress, demo).

Logs never carry patient data above DEBUG. Two libraries would break that by default:
pydicom logs and warns about invalid values with the raw value (a malformed
PatientBirthDate, a person name in the wrong VR), and apscheduler writes an INFO line for
every dispatcher tick (and a WARNING for every tick skipped while one runs long), burying
the node's own lines. pynetdicom and highdicom write INFO lines for every instance received
or sent and every module copied (hundreds per series, and their cost shows in the ingest
time); the node logs one summary line per association and per result instead.
"""

from __future__ import annotations

import hashlib
import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int, fmt: str = FORMAT) -> None:
    """``logging.basicConfig`` plus the library levels above; pydicom's value checks are
    silenced unless ``level`` is DEBUG (the writers repair what they take from headers)."""
    logging.basicConfig(level=level, format=fmt)
    # a tick that overruns its interval is skipped, with a WARNING each time: normal while
    # a series is routed; a tick that raises is still an ERROR
    logging.getLogger("apscheduler").setLevel(level if level <= logging.DEBUG else logging.ERROR)
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if level > logging.DEBUG:
        import pydicom.config

        logging.getLogger("pydicom").setLevel(logging.ERROR)
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def series_ref(key: str) -> str:
    """How a series is named in logs above DEBUG: the calling AE title and the hash part of
    its spool key (``series_key``), without the tail of its Series Instance UID, which is
    an identifier. Anything that is not a spool key is hashed whole."""
    found = re.fullmatch(r"(.*)-[0-9.x]+-([0-9a-f]{16})", key)
    if found:
        return f"{found.group(1)}-{found.group(2)[:10]}"
    return "s-" + hashlib.sha1(key.encode()).hexdigest()[:10]
