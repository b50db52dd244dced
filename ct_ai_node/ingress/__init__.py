"""DICOM ingress: the node's Storage SCP writing into the spool (see ``scp.py``)."""

from .scp import AllowedCaller, ScpSettings, StorageSCP, TlsSettings, ssl_context_for

__all__ = ["AllowedCaller", "ScpSettings", "StorageSCP", "TlsSettings", "ssl_context_for"]
