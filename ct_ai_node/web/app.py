"""The web app: pages for people, a JSON API for scripts (and the pages' buttons).

``/``                       dashboard (services, disk, retention, queue, destinations, studies)
``/jobs/{id}``              a job: result, heat-map previews, deliveries, audit trail, actions
``/audit``                  the audit log
``/login``, ``/logout``     sessions (signed cookie) for ``web.users``
``/api/...``                the same as JSON (OpenAPI at ``/docs``); ``POST /api/jobs/{id}/{action}``
                            with action rerun, resend, requeue or cancel; ``POST /api/jobs/requeue-dead``
``/dicomweb/studies``       STOW-RS ingress (token, a user's password, or open on loopback)
``/status``                 the dashboard's data as JSON (the old status page's address)
``/metrics``, ``/healthz``  Prometheus text; 200 when every service is up, else 503

Who may do what: viewers look, admins act. Browsers prove a state-changing request with
the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) or by sending
JSON (which a foreign page cannot do without a CORS pre-flight, which is never granted);
scripts send ``Authorization: Bearer <token>``. Without users the app is bound to loopback,
every caller is the administrator ``local``, and requests must name a loopback host (no
DNS rebinding).
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry, generate_latest
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ct_ai_node.config import ConfigError, NodeConfig
from ct_ai_node.jobqueue import JobNotFound, JobQueue, JobStateError
from ct_ai_node.node import job_actions
from ct_ai_node.node.audit import AuditLog
from ct_ai_node.node.config_store import ConfigStore
from ct_ai_node.node.series_fetch import spool_series_path
from ct_ai_node.node.status import MetricsCollector
from ct_ai_node.config_edit import EDITABLE_SECTIONS
from ct_ai_node.web import views
from ct_ai_node.web.auth import (
    OPEN_PRINCIPAL,
    Principal,
    check_basic,
    check_bearer,
    check_password,
    csrf_matches,
    session_user,
)

logger = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
#: seconds the dashboard's data is reused (every page refreshes itself every 10 s)
DASHBOARD_TTL_S = 1.0
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class Unauthenticated(Exception):
    pass


def create_app(config_source: Callable[[], NodeConfig], queue: JobQueue, spool, audit: AuditLog,
               services: Callable[[], dict], secret: str, store: ConfigStore | None = None,
               make_room: Callable | None = None, job_log=None) -> FastAPI:
    """The app over the node's queue, spool and audit log. ``config_source()`` is the
    configuration in force (it changes when edited); ``services()`` says what runs (name ->
    {"up": bool, "detail": str}); ``secret`` signs the session cookies; ``store`` edits the
    configuration file (None: the node runs without one, the configuration is read-only);
    ``make_room`` frees delivered data before a STOW-RS request is refused for space;
    ``job_log`` (a :class:`~ct_ai_node.node.job_log.JobLog`) holds each job's log lines."""
    web = config_source().web
    assert web is not None, "create_app needs config.web"
    lock = threading.Lock()  # one SQLite connection per object: one request at a time
    # the dashboard's data for DASHBOARD_TTL_S: twenty people (or scripts) polling it cost one
    # computation per second, not twenty, beside the SCP in this process
    cached: dict[tuple, tuple[float, dict]] = {}

    def dashboard_data(state: str | None, kind: str | None, limit: int = 50) -> dict:
        key = (state, kind, limit)
        now = time.monotonic()
        with lock:
            hit = cached.get(key)
            if hit is not None and now - hit[0] < DASHBOARD_TTL_S:
                return hit[1]
            data = views.dashboard(config_source(), queue, spool, services, state=state, kind=kind, limit=limit,
                                   job_log=job_log)
            if len(cached) > 64:
                cached.clear()
            cached[key] = (now, data)
            return data

    registry = CollectorRegistry()
    registry.register(MetricsCollector(queue, spool))
    app = FastAPI(title="ct-ai-node", summary="The administrator's API of a ct-ai-node",
                  openapi_url="/api/openapi.json", docs_url="/docs", redoc_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="ctai_session",
                       max_age=int(web.session_max_age_h * 3600), same_site="lax", https_only=False)
    if web.open:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)

    # -- who is asking ------------------------------------------------------------------

    def principal_of(request: Request) -> Principal | None:
        auth = request.headers.get("authorization")
        if auth:
            found = check_bearer(web, auth)
            if found is None:
                raise HTTPException(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
            return found
        if web.open:
            return OPEN_PRINCIPAL
        return session_user(web, request.session.get("user"))

    def csrf_of(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(24)
        return token

    def viewer(request: Request) -> Principal:
        who = principal_of(request)
        if who is None:
            raise Unauthenticated()
        if who.role in ("sender", "worker"):
            raise HTTPException(403, f"{who.name} may only "
                                     f"{'send images (STOW-RS)' if who.role == 'sender' else 'fetch series (WADO-RS)'}")
        return who

    async def checked_change(request: Request, need_admin: bool = True) -> tuple[Principal, dict]:
        """Who is behind a state-changing request, and its form fields: CSRF checked for
        browsers; an admin unless ``need_admin`` is false."""
        who = viewer(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        form = dict(await request.form()) if ctype in _FORM_TYPES else {}
        if who.via != "token" and ctype != "application/json":
            supplied = form.get("csrf") or request.headers.get("x-csrf-token")
            if not csrf_matches(request.session.get("csrf"), supplied):
                raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        if need_admin and not who.is_admin:
            raise HTTPException(403, f"{who.name} is a viewer; only an admin may change things")
        return who, form

    @app.exception_handler(Unauthenticated)
    async def _login_first(request: Request, exc: Unauthenticated):
        if request.url.path.startswith("/api/") or request.url.path == "/status":
            return JSONResponse({"detail": "log in or send an API token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    def render(request: Request, template: str, who: Principal | None, **context) -> HTMLResponse:
        flash = request.session.pop("flash", None)
        return TEMPLATES.TemplateResponse(request, template, {
            "principal": who, "csrf": csrf_of(request), "open_mode": web.open, "web_host": web.host,
            "ae_title": config_source().node.ae_title, "flash": flash[1] if flash else None,
            "flash_kind": flash[0] if flash else "", **context})

    # -- pages --------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard_page(request: Request, state: str | None = None, kind: str | None = None):
        who = viewer(request)
        return render(request, "dashboard.html", who, d=dashboard_data(_state(state), _kind(kind)))

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_html(request: Request, job_id: int):
        who = viewer(request)
        with lock:
            page = views.job_page(config_source(), queue, audit, job_id, job_log)
        if page is None:
            raise HTTPException(404, f"no job {job_id}")
        return render(request, "job.html", who, p=page)

    @app.get("/jobs/{job_id}/preview/{index}.png", include_in_schema=False)
    def preview_png(request: Request, job_id: int, index: int):
        viewer(request)
        files = views.previews(config_source().storage.outbox_dir, job_id)
        if not 0 <= index < len(files):
            raise HTTPException(404, f"job {job_id} has no heat-map image {index}")
        return Response(_png_of(files[index]), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request):
        who = viewer(request)
        return render(request, "audit.html", who, entries=[e.as_dict() for e in audit.entries(limit=500)])

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/"):
        if web.open:
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html", None, next=_local_path(next))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = dict(await request.form())
        if not csrf_matches(request.session.get("csrf"), form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        who = check_password(web, str(form.get("name", "")), str(form.get("password", "")))
        if who is None:
            audit.record(str(form.get("name", ""))[:64] or "?", "login", "refused", "wrong user name or password")
            request.session["flash"] = ("error", "Wrong user name or password.")
            return RedirectResponse(f"/login?next={quote(_local_path(form.get('next')))}", status_code=303)
        request.session.clear()  # a new session (and CSRF token) on every log-in
        request.session["user"] = who.name
        audit.record(who.name, "login", "ok", f"role {who.role}")
        return RedirectResponse(_local_path(form.get("next")), status_code=303)

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        who, _ = await checked_change(request, need_admin=False)
        request.session.clear()
        audit.record(who.name, "logout", "ok", "")
        return RedirectResponse("/login", status_code=303)

    # -- JSON API -----------------------------------------------------------------------

    @app.get("/api/status", tags=["status"])
    def api_status(request: Request, state: str | None = None, kind: str | None = None, limit: int = 50):
        """The dashboard's data: services, disk, retention, queue, destinations, jobs."""
        viewer(request)
        return dashboard_data(_state(state), _kind(kind), max(1, min(limit, 1000)))

    app.add_api_route("/status", api_status, methods=["GET"], include_in_schema=False)

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def api_job(request: Request, job_id: int):
        """One job with its result summary, deliveries and audit trail."""
        viewer(request)
        with lock:
            page = views.job_page(config_source(), queue, audit, job_id, job_log)
        if page is None:
            raise HTTPException(404, f"no job {job_id}")
        return page

    @app.get("/api/audit", tags=["audit"])
    def api_audit(request: Request, job_id: int | None = None, limit: int = 100):
        """The audit log, newest first."""
        viewer(request)
        return [e.as_dict() for e in audit.entries(job_id=job_id, limit=max(1, min(limit, 5000)))]

    @app.post("/api/jobs/requeue-dead", tags=["jobs"])
    async def api_requeue_dead(request: Request):
        """Requeue every dead job (admin)."""
        who, form = await checked_change(request)
        with lock:
            lines = job_actions.requeue_dead(queue)
        cached.clear()
        detail = f"{len(lines)} dead job(s) queued again"
        audit.record(who.name, "requeue-dead", "ok", detail)
        return _answer(request, form, {"ok": True, "message": detail, "jobs": lines}, "/")

    @app.post("/api/jobs/{job_id}/{action}", tags=["jobs"])
    async def api_job_action(request: Request, job_id: int, action: str):
        """``rerun`` (analyse the series again as a new job), ``resend`` (send the results
        again), ``requeue`` (a failed or dead job), ``cancel`` (a queued job); admin."""
        who, form = await checked_change(request)
        if action not in job_actions.ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}: one of {', '.join(job_actions.ACTIONS)}")
        new_id = None
        try:
            with lock:
                if action == "rerun":
                    new_id = job_actions.rerun(queue, spool, job_id, who.name)
                    message = f"job {job_id}: re-run as job {new_id}"
                elif action == "resend":
                    message = job_actions.resend(queue, job_id)
                elif action == "requeue":
                    message = job_actions.requeue(queue, job_id)
                else:
                    message = job_actions.cancel(queue, job_id, who.name)
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except JobStateError as exc:
            audit.record(who.name, action, "refused", str(exc), job_id)
            if form:
                request.session["flash"] = ("error", str(exc))
                return RedirectResponse(f"/jobs/{job_id}", status_code=303)
            raise HTTPException(409, str(exc)) from None
        cached.clear()  # the dashboard shows the change at once
        audit.record(who.name, action, "ok", message, job_id)
        if new_id is not None:
            audit.record(who.name, "created", "ok", f"re-run of job {job_id}", new_id)
        return _answer(request, form, {"ok": True, "message": message, "job_id": new_id or job_id},
                       f"/jobs/{new_id or job_id}")

    # -- configuration ------------------------------------------------------------------

    def config_texts(overrides: dict[str, str] | None = None) -> dict[str, str]:
        if store is None:
            return {}
        texts = {section: store.section_text(section) for section in EDITABLE_SECTIONS}
        texts.update(overrides or {})
        return texts

    def config_page_response(request: Request, who: Principal, *, texts=None, problems=None, section=None,
                             tested=None, status_code: int = 200):
        with lock:
            series = views.recent_series(spool)
        response = render(request, "config.html", who, store=store, texts=config_texts(texts), problems=problems or [],
                          pending=store.pending_restart() if store is not None else [],
                          problem_section=section, tested=tested, series=series,
                          destinations=views.destinations_health(config_source(), queue), node=config_source().node,
                          notifications=[{"name": n.name, "kind": n.kind, "events": ", ".join(n.events),
                                          "rules": ", ".join(n.rules) or "every rule",
                                          "target": n.url if n.kind == "webhook" else ", ".join(n.to)}
                                         for n in config_source().notifications])
        response.status_code = status_code
        return response

    @app.get("/config", response_class=HTMLResponse, include_in_schema=False)
    def config_page(request: Request):
        return config_page_response(request, viewer(request))

    @app.get("/api/config/{section}", tags=["configuration"])
    def api_config_section(request: Request, section: str):
        """One editable section as YAML text (passwords masked)."""
        viewer(request)
        if store is None:
            raise HTTPException(409, "the node runs without a configuration file: nothing to edit")
        try:
            return {"section": section, "text": store.section_text(section)}
        except ConfigError as exc:
            raise HTTPException(404, "; ".join(exc.problems)) from None

    @app.post("/api/config/{section}", tags=["configuration"])
    async def api_config_save(request: Request, section: str):
        """Validate an edited section (``text``: YAML) with check-config's messages; with
        ``save`` true (the default) write it to the file and apply it without a restart."""
        who, form = await checked_change(request)
        body = form or (await request.json() if _is_json(request) else {})
        text, save = str(body.get("text", "")), str(body.get("save", "true")).lower() not in ("false", "0", "")
        if form:
            save = form.get("do") != "check"
        if store is None:
            raise HTTPException(409, "the node runs without a configuration file: nothing to edit")
        try:
            if save:
                _, summary = store.save(section, text)
            else:
                store.check(section, text)
                summary = f"{section}: valid (not saved)"
        except ConfigError as exc:
            if save:
                audit.record(who.name, "config", "refused", f"{section}: {len(exc.problems)} problem(s)")
            if form:
                return config_page_response(request, who, texts={section: text}, problems=exc.problems,
                                            section=section, status_code=422)
            return JSONResponse({"ok": False, "problems": exc.problems}, status_code=422)
        except ValueError as exc:  # the node refused to apply it
            audit.record(who.name, "config", "refused", str(exc))
            raise HTTPException(409, str(exc)) from None
        if save:
            cached.clear()
            audit.record(who.name, "config", "ok", summary)
        return _answer(request, form, {"ok": True, "message": summary}, "/config")

    @app.post("/api/destinations/{name}/test", tags=["configuration"])
    async def api_destination_test(request: Request, name: str):
        """C-ECHO (dicom) or an HTTP request (stow, orthanc) to a configured destination."""
        from starlette.concurrency import run_in_threadpool

        from ct_ai_node.egress.probe import probe_destination

        who, form = await checked_change(request)
        config = config_source()
        try:
            config.destination(name)
        except KeyError:
            raise HTTPException(404, f"no destination {name!r}") from None
        result = await run_in_threadpool(probe_destination, config, name)
        return tested(request, who, form, "test-destination", name, result.ok, result.message)

    def tested(request: Request, who: Principal, form: dict, action: str, name: str, ok: bool, message: str):
        """A Test button's answer: in the audit log, then a flash message or JSON."""
        audit.record(who.name, action, "ok" if ok else "failed", f"{name}: {message}")
        if form:
            request.session["flash"] = ("ok" if ok else "error", f"{name}: {message}")
            return RedirectResponse("/config", status_code=303)
        return {"ok": ok, "message": message}

    @app.post("/api/notifications/{name}/test", tags=["configuration"])
    async def api_notification_test(request: Request, name: str):
        """Send a sample message (no patient data) through a configured notification."""
        from starlette.concurrency import run_in_threadpool

        from ct_ai_node.node.notifier import send_test_message

        who, form = await checked_change(request)
        config = config_source()
        try:
            config.notification(name)
        except KeyError:
            raise HTTPException(404, f"no notification {name!r}") from None
        ok, message = await run_in_threadpool(send_test_message, config, name, str(request.base_url).rstrip("/"))
        return tested(request, who, form, "test-notification", name, ok, message)

    @app.post("/api/rules/test", tags=["configuration"])
    async def api_rules_test(request: Request):
        """Route a received series (``series``: its reference) or an uploaded DICOM file
        (``file``) with the rules given (``rules``, ``routing``: YAML; default: those in
        force) and say why. Nothing is saved or sent."""
        from starlette.concurrency import run_in_threadpool

        who, form = await checked_change(request, need_admin=False)
        body = form or (await request.json() if _is_json(request) else {})
        try:
            config = _candidate(config_source(), store, body)
            decision, what = await run_in_threadpool(_route_for_test, config, spool, lock, body)
        except ConfigError as exc:
            if form:
                return config_page_response(request, who, texts=_typed_rules(body),
                                            problems=exc.problems, section="rules", status_code=422)
            return JSONResponse({"ok": False, "problems": exc.problems}, status_code=422)
        lines = views.decision_lines(decision)
        tested = {"what": what, "lines": lines}
        if form:
            return config_page_response(request, who, texts=_typed_rules(body), tested=tested)
        return {"ok": True, "series": what, "actions": [views.action_line(a) for a in decision.actions],
                "explanation": decision.explanation}

    # -- DICOMweb ingress ---------------------------------------------------------------

    @app.post("/dicomweb/studies", tags=["dicomweb"])
    @app.post("/dicomweb/studies/{study}", tags=["dicomweb"])
    async def stow_rs(request: Request, study: str | None = None):
        """STOW-RS: store instances (``multipart/related; type="application/dicom"``) into
        the spool, as a C-STORE would; answered in DICOM JSON once they are on disk."""
        from starlette.concurrency import run_in_threadpool

        from ct_ai_node.ingress.stow import StowRequestError, parse_multipart_related, store_parts

        auth = request.headers.get("authorization") or ""
        who = check_basic(web, auth) if auth.lower().startswith("basic ") else principal_of(request)
        if who is None:
            return JSONResponse({"detail": "send a token (Bearer) or a user's password (Basic)"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="ct-ai-node", Bearer'})
        if who.role not in ("admin", "sender"):
            raise HTTPException(403, f"{who.name} is a {who.role}; sending images needs the sender or admin role")
        config = config_source()
        calling_ae = "DICOMWEB" if who.via == "open" else who.name.upper()[:16]
        host = request.client.host if request.client else ""
        if not config.caller_allowed(calling_ae, host):
            raise HTTPException(403, f"{calling_ae} from {host} is not among the allowed callers")
        limit = web.stow_max_mb * 2**20
        too_big = HTTPException(413, f"the node accepts at most {web.stow_max_mb:g} MB per STOW-RS request "
                                     "(send the study in parts)")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked request has no length to check first
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            parts = parse_multipart_related(request.headers.get("content-type", ""), body)
        except StowRequestError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        storage = config.storage
        outcome = await run_in_threadpool(store_parts, parts, spool, calling_ae=calling_ae,
                                          called_ae=config.node.ae_title, host=host, min_free_mb=storage.min_free_mb,
                                          max_spool_mb=storage.max_spool_mb, make_room=make_room)
        if outcome.status == 507:
            headers = {"Retry-After": "300"}
            if not outcome.stored and not outcome.failed:
                return JSONResponse({"detail": outcome.message}, status_code=507, headers=headers)
            return JSONResponse(outcome.dicom_json(), status_code=507, media_type="application/dicom+json",
                                headers=headers)
        return JSONResponse(outcome.dicom_json(), status_code=outcome.status, media_type="application/dicom+json")

    @app.get(spool_series_path("{series_key}", "{study}", "{series}"), tags=["dicomweb"])
    def wado_rs_series(request: Request, series_key: str, study: str, series: str):
        """WADO-RS retrieve of one received series from the spool, as the workers on other
        hosts fetch it (role ``worker`` or ``admin``): ``multipart/related;
        type="application/dicom"``, each instance byte for byte as it was received."""
        who = principal_of(request)
        if who is None:
            return JSONResponse({"detail": "send a token (Bearer) with role worker"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if who.role not in ("admin", "worker"):
            raise HTTPException(403, f"{who.name} is a {who.role}; fetching series needs the worker or admin role")
        record = spool.get_series(series_key)
        if record is None or (record.study_instance_uid, record.series_instance_uid) != (study, series):
            raise HTTPException(404, "no such series in the spool (removed by retention, or never received)")
        paths = spool.instance_paths(series_key)
        if not paths:
            raise HTTPException(404, "the series has no instances in the spool")
        boundary = secrets.token_hex(16)

        def body():
            for path in paths:
                try:
                    data = path.read_bytes()
                except OSError:  # removed meanwhile: the worker sees fewer instances and says so
                    continue
                yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n").encode() + data + b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')

    # -- for machines -------------------------------------------------------------------

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        with lock:
            return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/healthz", tags=["status"])
    def healthz():
        """200 when every service of the node runs, 503 otherwise (no authentication, no data)."""
        state = services()
        down = sorted(name for name, s in state.items() if not s.get("up"))
        return JSONResponse({"status": "degraded" if down else "ok", "down": down}, status_code=503 if down else 200)

    return app


def _answer(request: Request, form: dict, body: dict, redirect_to: str):
    """JSON for scripts; a redirect with a flash message for the pages' forms."""
    if form:
        request.session["flash"] = ("ok", body["message"])
        return RedirectResponse(redirect_to, status_code=303)
    return body


def _state(value: str | None) -> str | None:
    from ct_ai_node.jobqueue import JobState

    if not value:
        return None
    if value not in {s.value for s in JobState}:
        raise HTTPException(422, f"state: {value!r} is not one of {', '.join(s.value for s in JobState)}")
    return value


def _kind(value: str | None) -> str | None:
    if not value:
        return None
    if value not in ("analyse", "forward", "deliver", "notify"):
        raise HTTPException(422, f"kind: {value!r} is not one of analyse, forward, deliver, notify")
    return value


def _local_path(value) -> str:
    """Only a path on this app after log-in (no open redirect to another site)."""
    text = str(value or "/")
    return text if text.startswith("/") and not text.startswith("//") and "\\" not in text else "/"


def _png_of(path: Path) -> bytes:
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if getattr(ds, "NumberOfFrames", 1) and int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    image = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else None)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _typed_rules(body: dict) -> dict[str, str]:
    """The rules text the tester was given (shown again in the editor)."""
    text = str(body.get("rules") or body.get("text") or "")
    return {"rules": text} if text.strip() else {}


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"


def _candidate(config: NodeConfig, store: ConfigStore | None, body: dict) -> NodeConfig:
    """The configuration in force, or with the rules / routing of the tester's form (the
    editor's text, saved or not) in place of the file's, validated with check-config's messages."""
    from ct_ai_node.config_edit import parse_section, validate

    texts = {"rules": str(body.get("rules") or body.get("text") or ""), "routing": str(body.get("routing") or "")}
    texts = {k: v for k, v in texts.items() if v.strip()}
    if not texts:
        return config
    if store is None:
        raise ConfigError(["rules: the node runs without a configuration file; the rules in force are tested"])
    data = store.file_data()
    for section, text in texts.items():
        data[section] = parse_section(text, section)
    return validate(data, store.base)


def _route_for_test(config: NodeConfig, spool, lock: threading.Lock, body: dict):
    """(decision, what was routed) for the rule tester."""
    import tempfile

    import pydicom

    from ct_ai_node.logs import series_ref
    from ct_ai_node.node.dispatcher import route_series
    from ct_ai_node.rules.routing import facts_from_datasets, route

    upload = body.get("file")
    if upload is not None and getattr(upload, "filename", ""):
        data = upload.file.read()
        with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                ds = pydicom.dcmread(tmp.name, stop_before_pixels=True, force=True)
                ds.SOPClassUID  # noqa: B018 - a file without it is not a DICOM instance
            except Exception as exc:  # noqa: BLE001 - any unreadable upload
                raise ConfigError([f"file: not a readable DICOM file ({type(exc).__name__})"]) from None
        calling = str(body.get("calling_ae") or "")
        facts = facts_from_datasets([ds], calling_ae=calling, called_ae=config.node.ae_title)
        return route(config.rules, config.routing, facts), f"uploaded file ({len(data)} bytes), caller {calling or '-'}"
    wanted = str(body.get("series") or "")
    with lock:
        found = [r for r in spool.series() if series_ref(r.key) == wanted]
        paths = spool.instance_paths(found[0].key) if found else []
    if not found or not paths:
        raise ConfigError([f"series: {wanted or '(none chosen)'} is not in the spool (choose a received series "
                           "or upload a file)"])
    try:
        return route_series(config, found[0], paths), f"series {wanted} ({len(paths)} instances)"
    except Exception as exc:  # noqa: BLE001 - RouteFailed and damaged headers alike
        raise ConfigError([f"series: {wanted} cannot be routed ({exc})"]) from None
