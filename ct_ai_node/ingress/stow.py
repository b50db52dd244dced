"""DICOMweb STOW-RS ingress (``POST /dicomweb/studies``): the same spool, checks and
answers as the Storage SCP, in HTTP's words.

A request is ``multipart/related; type="application/dicom"``, one Part-10 file per part.
Each instance is checked as a C-STORE would be (readable UIDs, the file meta agreeing with
the data set), stored with the same Part-10 re-encoding and ``fsync``, and answered only
once every part is on disk. The answer is the DICOM JSON of PS3.18: the stored instances
in ReferencedSOPSequence, the refused ones in FailedSOPSequence with the C-STORE failure
reason (0xC000 cannot understand, 0xA900 data set does not match, 0xA700 out of
resources); HTTP 200 all stored, 202 some, 409 none (the data is wrong), 507 not enough
space (nothing stored: the sender keeps its data and tries again later, as after A700).
Parsing and checking are pure; the spool is the only side effect.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

from ..logs import series_ref
from ..spool import BadInstance, InstanceMeta, Spool, dataset_header, part10, split_part10
from .scp import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH, OUT_OF_RESOURCES, shortfall, uid_problem

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


class StowRequestError(Exception):
    """The request itself is wrong (not multipart/related, no parts): HTTP 400/415."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a ``multipart/related`` body."""
    if not content_type.lower().startswith("multipart/related"):
        raise StowRequestError(415, f"Content-Type must be multipart/related; type=\"application/dicom\", "
                                    f"got {content_type.split(';')[0] or 'none'}")
    match = re.search(r'type="?([^";]+)"?', content_type, re.I)
    if match and match.group(1).strip().lower() != "application/dicom":
        raise StowRequestError(415, f"only application/dicom parts are accepted (type={match.group(1)})")
    if not re.search(r"boundary=", content_type, re.I):
        raise StowRequestError(400, "multipart/related without a boundary")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise StowRequestError(400, "the body is not a multipart/related message")
    parts = [(part.get_content_type(), part.get_payload(decode=True) or b"") for part in message.iter_parts()]
    if not parts:
        raise StowRequestError(400, "no parts in the request")
    return parts


@dataclass
class StowOutcome:
    status: int
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (..., failure reason)
    series_keys: set[str] = field(default_factory=set)
    #: series key -> the SOP Instance UIDs stored into it
    carried: dict[str, set[str]] = field(default_factory=dict)
    message: str = ""

    def dicom_json(self) -> dict:
        def ref(cls: str, uid: str) -> dict:
            return {REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [cls]} if cls else {"vr": "UI"},
                    REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}}

        out: dict = {}
        if self.stored:
            out[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [ref(c, u) for c, u in self.stored]}
        if self.failed:
            out[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
                {**ref(c, u), FAILURE_REASON: {"vr": "US", "Value": [reason]}} for c, u, reason in self.failed]}
        return out


def store_parts(parts: list[tuple[str, bytes]], spool: Spool, *, calling_ae: str, called_ae: str, host: str,
                min_free_mb: float, max_spool_mb: float | None, make_room=None, release: bool = True) -> StowOutcome:
    """Check and store every part; the outcome says what became of each. ``release``: the
    request ends the sender's turn, as a released association does."""
    total = sum(len(data) for _, data in parts)

    def short() -> int:
        return shortfall(spool, min_free_mb, max_spool_mb, total, len(parts))

    if short() > 0 and make_room is not None:
        try:  # delivered data goes first (never undelivered work), as for C-STORE
            make_room(short)
        except Exception:  # noqa: BLE001 - then the answer is 507, as without it
            log.exception("making room in the spool failed")
    if short() > 0:
        log.warning("STOW-RS from %s refused (507): %.0f MB free (minimum %.0f MB)", calling_ae, spool.free_mb(),
                    min_free_mb)
        return StowOutcome(507, message=f"not enough space: {spool.free_mb():.0f} MB free, the node keeps "
                                        f"{min_free_mb:.0f} MB; nothing was stored, send again later")
    outcome = StowOutcome(200)
    for ctype, data in parts:
        cls = uid = ""
        try:
            if ctype != "application/dicom":
                raise BadInstance(f"part of type {ctype}, not application/dicom")
            meta, dataset = split_part10(data)
            cls, uid = meta.get("MediaStorageSOPClassUID", ""), meta.get("MediaStorageSOPInstanceUID", "")
            transfer_syntax = meta["TransferSyntaxUID"]
            hdr = dataset_header(dataset, transfer_syntax)
        except BadInstance as exc:
            log.debug("STOW-RS from %s: part refused (0xC000): %s", calling_ae, exc)
            outcome.failed.append((cls, uid, CANNOT_UNDERSTAND))
            continue
        if (uid and uid != hdr["SOPInstanceUID"]) or (cls and hdr["SOPClassUID"] and cls != hdr["SOPClassUID"]):
            outcome.failed.append((cls, uid, DATA_SET_DOES_NOT_MATCH))
            continue
        cls, uid = hdr["SOPClassUID"] or cls, hdr["SOPInstanceUID"]
        problem = uid_problem(uid)
        if problem is not None and not problem[1]:
            outcome.failed.append((cls, uid, CANNOT_UNDERSTAND))
            continue
        info = InstanceMeta(sop_instance_uid=uid, sop_class_uid=cls, study_instance_uid=hdr["StudyInstanceUID"],
                            series_instance_uid=hdr["SeriesInstanceUID"], modality=hdr["Modality"],
                            calling_ae=calling_ae, called_ae=called_ae, caller_host=host,
                            transfer_syntax=transfer_syntax)
        try:
            stored = spool.store(part10(dataset, cls, uid, transfer_syntax, calling_ae), info)
        except Exception as exc:  # noqa: BLE001 - never answer success for an instance not on disk
            log.error("STOW-RS from %s: storing failed (0xA700): %s", calling_ae, type(exc).__name__)
            outcome.failed.append((cls, uid, OUT_OF_RESOURCES))
            continue
        outcome.stored.append((cls, uid))
        outcome.series_keys.add(stored.series_key)
        outcome.carried.setdefault(stored.series_key, set()).add(uid)
    if outcome.series_keys and release:  # the request is over: like a released association, complete sooner
        spool.mark_released(calling_ae, host, sorted(outcome.series_keys),
                            carried={k: len(v) for k, v in outcome.carried.items()})
    if any(reason == OUT_OF_RESOURCES for *_, reason in outcome.failed):
        outcome.status = 507
    elif outcome.failed:
        outcome.status = 202 if outcome.stored else 409
    outcome.message = f"{len(outcome.stored)} stored, {len(outcome.failed)} refused"
    log.info("STOW-RS from %s@%s: %s instance(s) stored, %d refused, series %s", calling_ae, host,
             len(outcome.stored), len(outcome.failed), ", ".join(series_ref(k) for k in sorted(outcome.series_keys)))
    return outcome
