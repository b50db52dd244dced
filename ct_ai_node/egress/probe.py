"""The web app's "Test" button: can the node reach a destination now?

``dicom``: a C-ECHO with the AE titles the node sends with; ``stow`` / ``orthanc``: an HTTP
GET of the destination's URL with its credentials. The answer is one line in plain words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from ct_ai_node.config import DicomDestination, NodeConfig

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str


def probe_destination(config: NodeConfig, name: str, timeout_s: float = 10.0) -> ProbeResult:
    dest = config.destination(name)
    if isinstance(dest, DicomDestination):
        return _echo(dest, dest.calling_ae(config.node.ae_title), timeout_s)
    password = dest.password.get_secret_value() if dest.password else None
    if dest.kind == "fhir":  # a FHIR server answers its CapabilityStatement at /metadata
        token = dest.token.get_secret_value() if dest.token else None
        return _http(dest.url.rstrip("/") + "/metadata", dest.username, password, timeout_s, token)
    return _http(dest.url, dest.username, password, timeout_s)


def _echo(dest: DicomDestination, calling_ae: str, timeout_s: float) -> ProbeResult:
    from ct_ai_node.egress.dicom import client_ae, client_tls, tls_problem

    where = f"{dest.ae_title} at {dest.host}:{dest.port}{' (TLS)' if dest.tls else ''}"
    tls_args = None
    if dest.tls is not None:
        try:
            ctx = client_tls(dest.tls.ca, dest.tls.cert, dest.tls.key, dest.tls.check_hostname)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return ProbeResult(False, f"C-ECHO: the TLS files cannot be used ({type(exc).__name__}: {exc})")
        problem = tls_problem(dest.host, dest.port, ctx, timeout_s)
        if problem is not None:
            return ProbeResult(False, f"C-ECHO: {problem}")
        tls_args = (ctx, dest.host)
    ae = client_ae(calling_ae, timeout_s)
    ae.add_requested_context(VERIFICATION)
    start = time.perf_counter()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    try:
        if assoc.is_rejected:
            return ProbeResult(False, f"C-ECHO: {where} rejected the association from {calling_ae} "
                                      "(is the node's AE title registered there, and the called AE title right?)")
        if assoc.is_aborted or not assoc.is_established:
            return ProbeResult(False, f"C-ECHO: no DICOM answer from {dest.host}:{dest.port} "
                                      "(nothing listening, a firewall, or TLS expected)")
        status = assoc.send_c_echo()
        ms = (time.perf_counter() - start) * 1000
        if status is None or "Status" not in status:
            return ProbeResult(False, f"C-ECHO: {where} did not answer the echo")
        if int(status.Status) != 0:
            return ProbeResult(False, f"C-ECHO: {where} answered status 0x{int(status.Status):04X}")
        return ProbeResult(True, f"C-ECHO: {where} answered success in {ms:.0f} ms")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _http(url: str, username: str | None, password: str | None, timeout_s: float,
          token: str | None = None) -> ProbeResult:
    auth = (username, password) if username else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        rsp = httpx.get(url, auth=auth, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return ProbeResult(False, f"HTTP: cannot reach {url} ({type(exc).__name__}: {exc})")
    if rsp.status_code in (401, 403):
        return ProbeResult(False, f"HTTP: {url} refused the credentials (HTTP {rsp.status_code})")
    if rsp.status_code >= 500:
        return ProbeResult(False, f"HTTP: {url} answered HTTP {rsp.status_code} (server error)")
    # 404 on a DICOMweb root is normal (only /studies... answer); the server is there
    return ProbeResult(True, f"HTTP: {url} answered HTTP {rsp.status_code}")
