"""Durable spool of received instances with an SQLite index (see ``store.py``)."""

from .dicomfile import BadInstance, dataset_header, part10, read_header, split_part10
from .store import (
    STATES,
    InstanceMeta,
    RecoveryReport,
    SeriesRecord,
    Spool,
    StoredInstance,
    instance_file_name,
    series_key,
)

__all__ = ["STATES", "BadInstance", "InstanceMeta", "RecoveryReport", "SeriesRecord", "Spool", "StoredInstance",
           "dataset_header", "instance_file_name", "part10", "read_header", "series_key", "split_part10"]
