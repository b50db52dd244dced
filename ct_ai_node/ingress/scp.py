"""The node's Storage SCP: C-STORE into the spool, C-ECHO, caller whitelist, TLS.

Why it is more than ``ae.start_server``:

* TCP_NODELAY on every accepted socket: DCMTK receivers without it took 13-16 s
  instead of ~1 s for a 300-slice study (delayed-ACK stalls). pynetdicom writes
  each PDU in one send, so it stalls less, but no sender must be able to hit it.
* A connection becomes a pynetdicom association only after its first bytes
  arrive. pynetdicom starts two polling threads per connection and counts them
  against ``maximum_associations``, so bare TCP connects that send nothing (port
  scanners, health checks) make it reject real callers until ``acse_timeout``
  (30 s by default; measured: 20 idle connects, echoscu refused for the whole
  ACSE timeout). Here such a connect costs one thread sleeping in ``select``.
* The TLS handshake runs in that per-connection thread, not in the accept loop
  (pynetdicom wraps in ``get_request``, where one silent client blocks everyone).
* One place (the per-connection thread, after the association thread ended)
  reports every association's end exactly once: release, abort, timeout or a
  dropped connection all give ``on_released(calling_ae, host, series_keys)``.

C-STORE answers 0x0000 only after ``Spool.store`` returned (file fsynced and
renamed, index row written); 0xA700 when the spool would drop below
``min_free_mb`` or storing failed; 0xC000 / 0xA900 for data we cannot use.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import select
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from pydicom import uid as dcm_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ..dimse_uids import install_lenient_uid_validator
from ..spool import BadInstance, InstanceMeta, Spool, StoredInstance, dataset_header, part10

log = logging.getLogger(__name__)

# pynetdicom refuses over-long UIDs in a command set; see ct_ai_node.dimse_uids
install_lenient_uid_validator()


def uid_problem(uid: str) -> tuple[str, bool] | None:
    """(what is wrong, whether it can be stored anyway) for a non-conformant UID, else None."""
    if uid.strip("0123456789.") or not uid[:1].isdigit():
        return "not digits and dots", False
    if len(uid) > 64:
        return f"{len(uid)} characters (more than 64)", True
    return None


def _same_uid(in_data_set: str, in_request: str) -> bool:
    # DCMTK's storescu cuts the request's Affected SOP Instance UID to 64 characters
    return in_data_set == in_request or (
        len(in_request) == 64 and len(in_data_set) > 64 and in_data_set.startswith(in_request))


#: accepted as sent: the spool keeps the bytes, nothing is decoded or transcoded here
TRANSFER_SYNTAXES = (
    dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian, dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian, dcm_uid.JPEGLossless, dcm_uid.JPEGLosslessSV1, dcm_uid.JPEGBaseline8Bit,
    dcm_uid.JPEGExtended12Bit, dcm_uid.JPEGLSLossless, dcm_uid.JPEGLSNearLossless, dcm_uid.JPEG2000Lossless,
    dcm_uid.JPEG2000, dcm_uid.HTJ2KLossless, dcm_uid.HTJ2KLosslessRPCL, dcm_uid.HTJ2K, dcm_uid.RLELossless,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

OnInstance = Callable[[StoredInstance, InstanceMeta], None]
OnReleased = Callable[[str, str, list[str]], None]
#: ``make_room(shortfall)`` frees space (deletes delivered data) until ``shortfall()`` (bytes
#: still missing) is <= 0 or nothing more may go; thread-safe (node/retention.py)
MakeRoom = Callable[[Callable[[], int]], object]
#: the spool file adds a 128-byte preamble and the file meta to the data set (an upper bound)
PART10_OVERHEAD = 1024


@dataclass(frozen=True)
class AllowedCaller:
    """``ae_title`` "*" = any AE title; ``host`` None = any address (else an IP or a name)."""

    ae_title: str = "*"
    host: str | None = None


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = True


@dataclass
class ScpSettings:
    ae_title: str = "CTAI"
    host: str = "0.0.0.0"
    port: int = 11112  # 0: the OS picks a free port (see StorageSCP.port)
    allowed_callers: list[AllowedCaller] = field(default_factory=list)  # empty: anyone may call
    max_associations: int = 8
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    min_free_mb: float = 2048.0
    max_spool_mb: float | None = None  # quota on the spool's instances (Spool.used_bytes); None: none
    tls: TlsSettings | None = None
    max_pdu_size: int = 1 << 20  # fewer, larger P-DATA PDUs: less Python work per instance
    max_pending_connections: int = 64  # connects that have not sent an A-ASSOCIATE-RQ yet

    def __post_init__(self) -> None:
        # accept (ae, host) tuples and dicts as well, as configs and tests write them
        callers = []
        for c in self.allowed_callers:
            if isinstance(c, AllowedCaller):
                callers.append(c)
            elif isinstance(c, dict):
                callers.append(AllowedCaller(c.get("ae_title", "*") or "*", c.get("host")))
            else:
                ae, host = tuple(c)
                callers.append(AllowedCaller(ae or "*", host))
        self.allowed_callers = callers


def _norm_ip(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def _resolve(host: str) -> set[str]:
    try:
        return {_norm_ip(ai[4][0]) for ai in socket.getaddrinfo(host, None)}
    except OSError:
        log.warning("allowed caller host %r does not resolve; it will match nothing", host)
        return set()


class _Whitelist:
    """Allowed (AE, addresses) pairs; host names are resolved once, at start."""

    def __init__(self, callers: Iterable[AllowedCaller]):
        self._rules = [(c.ae_title.strip(), _resolve(c.host) if c.host else None) for c in callers]

    def allows(self, calling_ae: str, address: str) -> bool:
        if not self._rules:
            return True
        ip = _norm_ip(address)
        return any((ae == "*" or ae == calling_ae.strip()) and (hosts is None or ip in hosts)
                   for ae, hosts in self._rules)


class _Handler(RequestHandler):
    """One thread per TCP connection; see the module docstring for why."""

    def handle(self) -> None:
        scp: StorageSCP = self.server.scp  # type: ignore[attr-defined]
        sock = self.request
        if not scp._enter_pending():
            log.warning("too many silent connections; closing one from %s", self.client_address[0])
            return self.server.shutdown_request(sock)
        try:
            ready = self._prepare(sock, scp.settings)
        finally:
            scp._leave_pending()
        if not ready or not scp._begin_association():
            return self.server.shutdown_request(sock)
        try:
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
            scp._association_ended(assoc)
        finally:
            scp._end_association()

    def _prepare(self, sock: socket.socket, s: ScpSettings) -> bool:
        """TCP_NODELAY, TLS handshake, then wait (without polling) for the first PDU."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(s.acse_timeout_s)
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            tls = isinstance(sock, ssl.SSLSocket)
            if not (tls and sock.pending()) and not select.select([sock], [], [], s.acse_timeout_s)[0]:
                log.info("connection from %s sent nothing for %.0f s; closed", self.client_address[0],
                         s.acse_timeout_s)
                return False
            if not tls and not sock.recv(1, socket.MSG_PEEK):
                return False  # closed without a word (a port check)
            # a peer that stalls mid-PDU: pynetdicom's recv raises, the association ends
            sock.settimeout(s.network_timeout_s)
            return True
        except (OSError, ssl.SSLError) as exc:
            log.warning("connection from %s failed before association: %s", self.client_address[0], exc)
            return False


class _Server(ThreadedAssociationServer):
    daemon_threads = True  # idle connections must not hold up stop()
    block_on_close = False
    request_queue_size = 128  # listen backlog: a burst of callers must not see dropped SYNs (1 s retries)

    def __init__(self, *args, scp: "StorageSCP", **kwargs):
        self.scp = scp
        super().__init__(*args, request_handler=_Handler, **kwargs)

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # pynetdicom's also unregisters from the AE's list
        self.server_close()


def ssl_context_for(tls: TlsSettings) -> ssl.SSLContext:
    if tls.require_client_cert and not tls.ca:
        raise ValueError("TLS: require_client_cert needs a CA file to check client certificates against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca:
        ctx.load_verify_locations(str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


@dataclass
class _AssocState:
    #: series key -> the SOP Instance UIDs this association stored into it
    series: dict[str, set[str]] = field(default_factory=dict)
    stored: int = 0
    failed: int = 0
    flagged: int = 0  # stored with a non-conformant SOP Instance UID


class StorageSCP:
    """A non-blocking Storage + Verification SCP writing into ``spool``.

    ``on_instance(stored, meta)`` runs after each stored instance (in the
    association's thread); ``on_released(calling_ae, host, series_keys)`` once
    per ended association that stored something, after ``Spool.mark_released``.
    """

    def __init__(self, settings: ScpSettings, spool: Spool, on_instance: OnInstance | None = None,
                 on_released: OnReleased | None = None, make_room: MakeRoom | None = None):
        self.settings = settings
        self.spool = spool
        self.make_room = make_room
        self.on_instance = on_instance
        self.on_released = on_released
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._assocs: dict[object, _AssocState] = {}
        self._pending = 0
        self._running = 0  # associations whose thread has not finished (stop() waits for them)
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._whitelist = _Whitelist(settings.allowed_callers)

    def set_allowed_callers(self, callers: list[AllowedCaller]) -> None:
        """Who may associate from now on (associations already open go on)."""
        whitelist = _Whitelist(callers)
        with self._lock:
            self.settings = replace(self.settings, allowed_callers=list(callers))
            self._whitelist = whitelist
        log.info("storage SCP %s: %d allowed caller rule(s)", self.settings.ae_title, len(callers))

    # ---- lifecycle -----------------------------------------------------------------------

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian])
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.maximum_pdu_size = s.max_pdu_size
        return ae

    def start(self) -> "StorageSCP":
        if self._server is not None:
            raise RuntimeError("the SCP is already running")
        s = self.settings
        self._whitelist = _Whitelist(s.allowed_callers)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
        ]
        ae = self._make_ae()
        self._server = ae.make_server((s.host, s.port), ssl_context=ssl_context_for(s.tls) if s.tls else None,
                                      evt_handlers=handlers, server_class=_Server, scp=self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"StorageSCP@{self.port}", daemon=True)
        self._thread.start()
        log.info("storage SCP %s listening on %s:%d%s (%d allowed caller rule(s))", s.ae_title, s.host, self.port,
                 " with TLS" if s.tls else "", len(s.allowed_callers))
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening, abort running associations, and wait until their threads are done
        (so the spool can be closed right after)."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            self._stopping = True
        server.shutdown()
        for assoc in server.active_associations:
            if assoc.is_established:
                assoc.abort()
            elif not (assoc.is_released or assoc.is_aborted or assoc.is_rejected):
                assoc.dul.kill_dul()  # still negotiating; its DUL thread would keep the process alive
        with self._idle:
            if not self._idle.wait_for(lambda: self._running == 0, timeout_s):
                log.warning("%d association(s) still running after %.0f s", self._running, timeout_s)
            self._stopping = False
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("storage SCP %s stopped", self.settings.ae_title)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return self._server.server_address[1]

    def __enter__(self) -> "StorageSCP":
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- connection accounting ----------------------------------------------------------

    def _enter_pending(self) -> bool:
        with self._lock:
            if self._pending >= self.settings.max_pending_connections:
                return False
            self._pending += 1
            return True

    def _leave_pending(self) -> None:
        with self._lock:
            self._pending -= 1

    def _begin_association(self) -> bool:
        with self._lock:
            if self._stopping or self._server is None:
                return False
            self._running += 1
            return True

    def _end_association(self) -> None:
        with self._idle:
            self._running -= 1
            self._idle.notify_all()

    # ---- event handlers -----------------------------------------------------------------

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        calling_ae = (assoc.requestor.primitive.calling_ae_title or "").strip()
        host = assoc.requestor.address
        if self._whitelist.allows(calling_ae, host):
            with self._lock:
                self._assocs[assoc] = _AssocState()
            return
        log.warning("association from %s@%s rejected: caller not in the allowed list", calling_ae, host)
        # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # waits until the DUL has sent the RJ and closed

    def _on_store(self, event) -> int:
        assoc = event.assoc
        calling_ae = assoc.requestor.ae_title.strip()
        host = assoc.requestor.address
        with self._lock:
            state = self._assocs.setdefault(assoc, _AssocState())
        status = self._store(event, calling_ae, host, state)
        if status != SUCCESS:
            state.failed += 1
        return status

    def _store(self, event, calling_ae: str, host: str, state: _AssocState) -> int:
        req = event.request
        try:
            dataset = event.encoded_dataset(include_meta=False)
        except Exception as exc:  # noqa: BLE001 - any failure here is the sender's data
            log.warning("C-STORE from %s refused (0xC000): no data set: %s", calling_ae, exc)
            return CANNOT_UNDERSTAND
        if self._shortfall(len(dataset)) > 0 and self.make_room is not None:
            try:  # delivered data goes first (never undelivered work), then we look again
                self.make_room(lambda: self._shortfall(len(dataset)))
            except Exception:  # noqa: BLE001 - then the answer is 0xA700, as without it
                log.exception("making room in the spool failed")
        if self._shortfall(len(dataset)) > 0:
            s = self.settings
            quota = f", {self.spool.used_bytes() / 2**20:.1f} of {s.max_spool_mb:.1f} MB spool quota used" \
                if s.max_spool_mb is not None else ""
            log.warning("C-STORE from %s refused (0xA700): %.0f MB free (minimum %.0f MB)%s", calling_ae,
                        self.spool.free_mb(), s.min_free_mb, quota)
            return OUT_OF_RESOURCES
        transfer_syntax = str(event.context.transfer_syntax)
        try:
            hdr = dataset_header(dataset, transfer_syntax)
        except BadInstance as exc:
            log.warning("C-STORE from %s refused (0xC000): %s", calling_ae, exc)
            return CANNOT_UNDERSTAND
        sop_class = str(req.AffectedSOPClassUID or "").strip()
        if not _same_uid(hdr["SOPInstanceUID"], str(req.AffectedSOPInstanceUID or "").strip()) or (
                hdr["SOPClassUID"] and hdr["SOPClassUID"] != sop_class):
            log.warning("C-STORE from %s refused (0xA900): SOP class/instance UID of the data set differ from "
                        "the request's", calling_ae)
            return DATA_SET_DOES_NOT_MATCH
        problem = uid_problem(hdr["SOPInstanceUID"])
        if problem is not None and not problem[1]:
            log.warning("C-STORE from %s refused (0xC000): SOP Instance UID is %s", calling_ae, problem[0])
            return CANNOT_UNDERSTAND
        if problem is not None:  # stored under a hashed file name; the loader mints valid UIDs
            with self._lock:
                state.flagged += 1
                first = state.flagged == 1
            log.log(logging.WARNING if first else logging.DEBUG, "C-STORE from %s: SOP Instance UID of %s; "
                    "stored anyway (counted in the association's summary)", calling_ae, problem[0])
        meta = InstanceMeta(
            sop_instance_uid=hdr["SOPInstanceUID"], sop_class_uid=sop_class,
            study_instance_uid=hdr["StudyInstanceUID"], series_instance_uid=hdr["SeriesInstanceUID"],
            modality=hdr["Modality"], calling_ae=calling_ae, called_ae=assoc_called_ae(event.assoc),
            caller_host=host, transfer_syntax=transfer_syntax)
        encoded = part10(dataset, sop_class, meta.sop_instance_uid, transfer_syntax, calling_ae)
        try:
            stored = self.spool.store(encoded, meta)
        except Exception as exc:  # noqa: BLE001 - never answer success for an instance not on disk
            # the message can name the spool path (which holds a UID tail): DEBUG only
            log.error("C-STORE from %s failed (0xA700): %s", calling_ae, type(exc).__name__)
            log.debug("C-STORE from %s failed: %s", calling_ae, exc)
            return OUT_OF_RESOURCES
        with self._lock:
            state.series.setdefault(stored.series_key, set()).add(stored.sop_instance_uid)
            state.stored += 1
        if self.on_instance is not None:
            try:
                self.on_instance(stored, meta)
            except Exception:  # noqa: BLE001 - the instance is safe on disk; a hook bug must not fail it
                log.exception("on_instance hook failed")
        return SUCCESS

    def _shortfall(self, incoming: int) -> int:
        return shortfall(self.spool, self.settings.min_free_mb, self.settings.max_spool_mb, incoming)

    def _association_ended(self, assoc) -> None:
        with self._lock:
            state = self._assocs.pop(assoc, None)
            # series that another open association also stores into: not carried whole by this one
            shared = {k for other in self._assocs.values() for k in other.series}
        if state is None:  # rejected, or never got past the request
            return
        calling_ae = (assoc.requestor.ae_title or "").strip()
        host = assoc.requestor.address
        how = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "ended"
        log.log(logging.INFO if state.stored or state.failed else logging.DEBUG,
                "association from %s@%s %s: %d instance(s) stored (%d with a non-conformant UID), %d refused, "
                "%d series", calling_ae, host, how, state.stored, state.flagged, state.failed, len(state.series))
        if not state.series:
            return
        keys = sorted(state.series)
        try:
            self.spool.mark_released(calling_ae, host, keys, carried={
                k: len(state.series[k]) for k in keys if k not in shared})
        except Exception:  # noqa: BLE001 - completeness falls back on the quiet time
            log.exception("could not mark %d series released", len(keys))
        if self.on_released is not None:
            try:
                self.on_released(calling_ae, host, keys)
            except Exception:  # noqa: BLE001
                log.exception("on_released hook failed")


def shortfall(spool: Spool, min_free_mb: float, max_spool_mb: float | None, incoming: int, instances: int = 1) -> int:
    """Bytes missing to store ``incoming`` more bytes (``instances`` files): below
    ``min_free_mb`` of free disk, or over the spool quota; 0 when it fits. Cheap (one
    statvfs, one counter): runs for every C-STORE and every STOW-RS request."""
    incoming += PART10_OVERHEAD * instances
    short = min_free_mb * 2**20 - (spool.free_mb() * 2**20 - incoming)
    if max_spool_mb is not None:
        short = max(short, spool.used_bytes() + incoming - max_spool_mb * 2**20)
    return max(0, int(math.ceil(short)))


def assoc_called_ae(assoc) -> str:
    try:
        return (assoc.requestor.primitive.called_ae_title or "").strip()
    except AttributeError:
        return ""
