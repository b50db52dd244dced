"""``DicomDestination``: C-STORE SCU (pynetdicom) to a PACS or any Storage SCP.

One association per ``send``; one presentation context per (SOP class, transfer
syntax) found in the files, read from their File Meta Information. Each file is stored
as read, with its own SOP Instance UID, so a re-send is idempotent at the peer. A Part-10
file whose transfer syntax the peer accepted as is goes out as its bytes, never decoded
and encoded again (pynetdicom's chunked sending); others (a bare data set, a syntax the
peer takes only in the other uncompressed encoding) are read and converted by pynetdicom.

Error classification (``DestinationError.retryable``):

- cannot connect, association aborted, ACSE/DIMSE timeout, reply lost: **retryable**
  (pynetdicom 3.0.4 now and then loses a C-STORE reply; see docs/design.md). A lost
  reply is first resumed once on a fresh association, from the instance concerned;
- association rejected: **retryable**, except a *permanent* rejection by the service
  user for an unrecognised calling or called AE title: that is configuration, and
  retries would only delay the admin seeing it;
- the peer accepted none of our presentation contexts (SOP class / transfer syntax
  not supported): **not retryable**;
- C-STORE failure status: 0xA7xx out of resources, 0x0110 processing failure,
  0x0213 resource limitation, 0x0210 duplicate invocation, 0xFE00 cancel:
  **retryable** (the peer's state, not our data). 0xA9xx data set does not match SOP
  class, 0xCxxx cannot understand, and every other failure (0x0122 SOP class not
  supported, 0x0124 not authorised, ...): **not retryable** - the same bytes will
  fail the same way;
- 0x0111 duplicate SOP instance counts as ``already_present``; warnings (0x0001,
  0xBxxx) count as sent.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association

from ct_ai_node.dimse_uids import install_lenient_uid_validator
from ct_ai_node.egress.base import DestinationError, SendReport, classify_status

log = logging.getLogger(__name__)

# a stored instance whose UID is over 64 characters is offered to the peer, not refused here
install_lenient_uid_validator()
# send_c_store(path) sends the file's bytes without decoding them (only with an exactly
# matching accepted context; _store checks that first). Decoding and encoding each result
# again cost about half of the sending time (277 objects of a 300-slice chest CT).
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True

#: how often pynetdicom's reader thread looks for data while we send (seconds)
SEND_POLL_S = 0.0002
#: DICOM allows at most 128 presentation contexts in one association request
MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: A-ASSOCIATE-RJ diagnostics (source 1, service user) that name a configuration error
_AE_TITLE_REJECTIONS = {3: "calling AE title not recognised", 7: "called AE title not recognised"}


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class: str
    transfer_syntax: str
    size: int
    #: the File Meta Information names the SOP class and instance and the transfer syntax
    part10: bool = False


def _read(path: Path, *, headers_only: bool) -> Dataset:
    ds = dcmread(path, stop_before_pixels=headers_only, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        # a bare data set (no Part 10 header): its encoding is all pydicom could tell
        implicit, little = ds.original_encoding
        if not little:
            raise InvalidDicomError("big endian data set without a transfer syntax")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _inspect(path: Path) -> _Item:
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError, ValueError, AttributeError):
        meta = None
    if meta is not None and all(meta.get(k) for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                                       "TransferSyntaxUID")):
        return _Item(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), path.stat().st_size,
                     part10=True)
    try:
        ds = _read(path, headers_only=True)
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if not sop_class:
            raise InvalidDicomError("no SOP Class UID")
        return _Item(path, str(sop_class), str(ds.file_meta.TransferSyntaxUID), path.stat().st_size)
    except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
        raise DestinationError(f"cannot read {path.name}: {exc}", retryable=False) from exc


def _let_reactor_resume(assoc: Association, limit_s: float = 0.05) -> None:
    """Wait (briefly) until pynetdicom's association reactor has resumed after a C-STORE.

    pynetdicom 3.0.4 pauses its reactor thread for each C-STORE with a flag that can be
    stale: when the next ``send_c_store`` starts before the reactor woke from the previous
    pause, it sees "paused", sends, and the waking reactor takes the reply off the queue as
    an "unexpected C-STORE service message"; the sender then waits out the DIMSE timeout
    (30 s, seen about once in six 600-slice deliveries: docs/performance.md). Once the
    reactor has cleared the flag, the next send waits for a real pause."""
    if not hasattr(assoc, "_is_paused"):
        return
    deadline = time.monotonic() + limit_s
    while assoc._is_paused and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.00005)


def _accepted(assoc: Association) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs the peer accepted on this association."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
            if cx.transfer_syntax}


def _contexts(items: list[_Item]) -> list:
    """One context per SOP class for uncompressed files (explicit or implicit VR:
    pynetdicom converts between them) plus one per compressed syntax, sent as is."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for it in items:
        syntaxes = _UNCOMPRESSED if UID(it.transfer_syntax) in _UNCOMPRESSED else (it.transfer_syntax,)
        wanted[(it.sop_class, tuple(syntaxes))] = None
    if len(wanted) > MAX_CONTEXTS:
        raise DestinationError(f"{len(wanted)} SOP class / transfer syntax pairs, more than the "
                               f"{MAX_CONTEXTS} presentation contexts of one association", retryable=False)
    return [build_context(sop, list(ts)) for sop, ts in wanted]


def _set_nodelay(event) -> None:
    # without it each C-STORE waits on the peer's delayed ACK (docs/design.md)
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ReplyLost(Exception):
    """The association died or the reply never came: safe to send the instance again."""


def client_ae(ae_title: str, timeout_s: float) -> AE:
    """An AE for calling a peer: every timeout (connect, ACSE, DIMSE, network) ``timeout_s``."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def client_tls(ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
               check_hostname: bool = True) -> ssl.SSLContext:
    """The TLS context the node calls a destination with: TLS 1.2 or later, the peer's
    certificate verified against ``ca`` (None: the system's CAs), the node's own certificate
    when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def tls_problem(host: str, port: int, ctx: ssl.SSLContext, timeout_s: float = 10.0) -> str | None:
    """Why a TLS handshake with ``host:port`` fails, in plain words (None when it works, or
    when nothing answers at all: that is said elsewhere)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        raw.settimeout(timeout_s)
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            # TLS 1.3: a peer that refuses our certificate says so just after the handshake;
            # a peer that accepted it waits for our first PDU
            tls.settimeout(0.5)
            try:
                tls.recv(1)
            except (socket.timeout, TimeoutError):
                pass
        return None
    except ssl.SSLCertVerificationError as exc:
        return f"certificate problem with {host}:{port}: {exc.verify_message} (check tls.ca, and tls.check_hostname)"
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if any(w in reason.lower() for w in ("certificate", "unknown_ca", "unknown ca", "bad cert")):
            return (f"{host}:{port} refused the TLS handshake ({reason}): it wants a client certificate it "
                    "trusts (tls.cert, tls.key)")
        return f"TLS handshake with {host}:{port} failed ({reason}); is it a TLS port?"
    except OSError as exc:
        return f"TLS handshake with {host}:{port} failed ({type(exc).__name__}); is it a TLS port?"
    finally:
        raw.close()


class DicomDestination:
    def __init__(self, name: str, host: str, port: int, ae_title: str, calling_ae_title: str = "CTAI",
                 timeout_s: float = 30, max_pdu: int = 0, resume_attempts: int = 1,
                 tls: ssl.SSLContext | None = None):
        self.tls = tls
        self.name = name
        self.host = host
        self.port = int(port)
        self.ae_title = ae_title
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu  # 0: no limit
        self.resume_attempts = resume_attempts

    def __repr__(self) -> str:
        return f"DicomDestination({self.name!r}, {self.ae_title}@{self.host}:{self.port})"

    def _error(self, message: str, retryable: bool) -> DestinationError:
        return DestinationError(message, retryable=retryable, destination=self.name)

    def _associate(self, contexts: list) -> Association:
        ae = client_ae(self.calling_ae_title, self.timeout_s)
        tls_args = (self.tls, self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, contexts, ae_title=self.ae_title,
                             max_pdu=self.max_pdu, evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
                             tls_args=tls_args)
        if assoc.is_established:
            # pynetdicom's reader thread sleeps this long whenever it finds nothing to do (1 ms,
            # "higher uses less CPU when idle"); each C-STORE waits on it: 0.2 ms while we send
            # (277 results of a chest CT: 1.9 s -> 1.5 s to a storescp on loopback)
            if hasattr(assoc.dul, "_run_loop_delay"):
                assoc.dul._run_loop_delay = SEND_POLL_S
            return assoc
        where = f"{self.ae_title}@{self.host}:{self.port}"
        if self.tls is not None and not assoc.is_rejected:
            problem = tls_problem(self.host, self.port, self.tls, self.timeout_s)
            if problem is not None:  # a certificate problem does not go away by retrying
                raise self._error(problem, retryable=False)
        rsp = assoc.acceptor.primitive
        if assoc.is_rejected and rsp is not None:
            config_error = rsp.result == 0x01 and rsp.result_source == 0x01 \
                and rsp.diagnostic in _AE_TITLE_REJECTIONS
            reason = _AE_TITLE_REJECTIONS.get(rsp.diagnostic) if config_error else rsp.reason_str
            raise self._error(f"association rejected by {where} ({rsp.result_str}: {reason}; "
                              f"we are {self.calling_ae_title})", retryable=not config_error)
        if rsp is not None and rsp.result == 0x00 and not assoc.accepted_contexts:
            sops = sorted({str(cx.abstract_syntax) for cx in contexts})
            raise self._error(f"{where} accepted no presentation context for SOP class(es) "
                              f"{', '.join(sops)}", retryable=False)
        if assoc.is_aborted:
            raise self._error(f"association aborted by {where}", retryable=True)
        raise self._error(f"cannot connect to {where} (refused, unreachable or no answer "
                          f"within {self.timeout_s:g} s)", retryable=True)

    def _store(self, assoc: Association, item: _Item) -> str:
        """Send one file; the classified status, or _ReplyLost."""
        if item.part10 and (item.sop_class, item.transfer_syntax) in _accepted(assoc):
            ds = item.path  # its bytes as they are
        else:
            try:
                ds = _read(item.path, headers_only=False)
            except (OSError, InvalidDicomError, ValueError) as exc:
                raise self._error(f"cannot read {item.path.name}: {exc}", retryable=False) from exc
        try:
            rsp = assoc.send_c_store(ds)
            _let_reactor_resume(assoc)
        except (ValueError, AttributeError) as exc:  # no accepted context fits this file
            raise self._error(f"cannot send {item.path.name}: {exc}", retryable=False) from exc
        except RuntimeError as exc:  # the association went away underneath us
            raise _ReplyLost(str(exc)) from exc
        if rsp is None or "Status" not in rsp:
            raise _ReplyLost("no C-STORE response (association aborted or DIMSE timeout)")
        status = int(rsp.Status)
        outcome = classify_status(status)
        if outcome in ("retry", "fatal"):
            raise self._error(f"C-STORE of {item.path.name} failed with status 0x{status:04X}",
                              retryable=outcome == "retry")
        if outcome == "warning":
            log.debug("C-STORE %s warning 0x%04X", item.path.name, status)
        return outcome

    def send(self, paths: list[Path]) -> SendReport:
        started = time.monotonic()
        items = [_inspect(Path(p)) for p in paths]
        if not items:
            return SendReport(sent=0, seconds=0.0, destination=self.name)
        contexts = _contexts(items)
        counts = {"ok": 0, "warning": 0, "already": 0}
        done, resumes_left = 0, self.resume_attempts
        while done < len(items):
            assoc = self._associate(contexts)
            try:
                while done < len(items):
                    counts[self._store(assoc, items[done])] += 1
                    done += 1
            except _ReplyLost as exc:
                if resumes_left <= 0:
                    raise self._error(f"C-STORE reply lost after {done} of {len(items)} instances: {exc}",
                                      retryable=True) from None
                resumes_left -= 1
                log.warning("%s: C-STORE reply lost after %d of %d instances; resuming on a new association",
                            self.name, done, len(items))
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
        seconds = time.monotonic() - started
        report = SendReport(sent=counts["ok"] + counts["warning"], already_present=counts["already"],
                            warnings=counts["warning"], seconds=seconds,
                            bytes_sent=sum(it.size for it in items), destination=self.name)
        log.info("%s: %d instance(s) stored at %s@%s:%d in %.2f s", self.name, report.total,
                 self.ae_title, self.host, self.port, seconds)
        return report
