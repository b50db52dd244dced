"""UIDs in DIMSE command sets as real senders send them.

pynetdicom 3.0 validates every UI value of a command set (Affected SOP Instance UID...)
against PS3.5's 64 characters, even with ``ENFORCE_UID_CONFORMANCE`` off, and the only
switch is a process-wide validator table. Both network edges (ingress SCP, egress SCU)
install the lenient one below.
"""

from __future__ import annotations

from pynetdicom import _config as pynetdicom_config

#: longest UID the DIMSE layer lets through (PS3.5 says 64; senders in the wild exceed it)
MAX_UID_CHARS = 256


def lenient_uid(value: object) -> tuple[bool, str]:
    """pynetdicom's ``_config.VALIDATORS["UI"]``, accepting over-long UIDs.

    pynetdicom 3.0 refuses a UID over 64 characters even with ENFORCE_UID_CONFORMANCE off,
    and a refused Affected SOP Instance UID loses the whole C-STORE: no response, the
    association aborted, the sender never learns why. Real senders do send such UIDs. With
    this, the request reaches ``StorageSCP._store``, which answers every C-STORE with a
    status (stores and flags an over-long UID; the spool names the file by a hash and the
    loader mints valid UIDs). Still refused: what cannot be carried as one UI value.
    """
    if not isinstance(value, str):
        return False, "must be pydicom.uid.UID"
    if not value:
        return False, "must not be an empty str"
    if len(value) > MAX_UID_CHARS:
        return False, f"must not exceed {MAX_UID_CHARS} characters"
    if not value.isascii() or "\\" in value:
        return False, "must be ASCII without backslashes"
    return True, ""


def install_lenient_uid_validator() -> None:
    """Use :func:`lenient_uid` for the whole process (pynetdicom has no per-AE setting).

    Called at import by the Storage SCP and by the C-STORE sender: a stored instance whose
    UID is over 64 characters must be forwarded with a status from the peer, not fail here."""
    pynetdicom_config.VALIDATORS["UI"] = lenient_uid
