"""The node's typed configuration: ``NodeConfig``, loaded from YAML by ``load_config``.

The schema follows docs/node.md. Every model forbids unknown keys, so a typo in
a PACS administrator's file is an error naming the field, not a silent default.
A wrong file raises ``ConfigError`` whose ``problems`` hold one line per wrong
field, ``dotted.field.path: message`` (``destinations.0.port: Input should be
less than 65536``). Checks that span sections (a rule naming an unknown
destination, duplicate names) report the path of the offending entry too.

No network here and no disk outside ``load_config``: the routing rules and the
tests build configs in memory with ``NodeConfig.model_validate`` or
``default_config``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

#: the pipeline an ``analyse`` rule runs when it names none
#: (mirrors ``ct_ai_node.pipeline.methods.DEFAULT_PIPELINE``, which imports torch)
DEFAULT_PIPELINE = "radlogics"
DEFAULT_LUNGS = "unet"
DESTINATION_KINDS = ("dicom", "stow", "orthanc", "fhir")
#: the destination kinds a rule's prior query can ask (C-FIND/C-GET; QIDO-RS/WADO-RS)
PRIOR_SOURCE_KINDS = ("dicom", "stow")
ACTIONS = ("analyse", "forward", "discard")
OPERATORS = ("equals", "in", "regex", "range", "exists", "contains")
#: condition targets besides ``tag`` (facts of the series and its association)
FACT_TARGETS = ("calling_ae", "called_ae", "instances", "image_type", "orientation")
ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique", "unknown")
#: keywords a routing rule cannot test: routing sees no pixel data and no sequences
_BULK_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` has one line per wrong field."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{len(self.problems)} configuration problem(s):\n" + "\n".join(self.problems))


# -- reusable field types -------------------------------------------------------

def _raise_at(title: str, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
    """Raise a ValidationError with one error per (loc, message).

    Used by cross-field checks so that their problems name the exact field
    (``rules.0.destinations.1``) instead of the model they were found in.
    """
    details = [
        InitErrorDetails(type=PydanticCustomError("config", "{message}", {"message": msg}), loc=loc, input=None)
        for loc, msg in errors
    ]
    raise ValidationError.from_exception_data(title, details)


def _check_ae_title(value: str) -> str:
    # PS3.5 AE VR: 1..16 characters of the default repertoire, no backslash or
    # control characters; leading/trailing spaces are not significant.
    text = value.strip()
    if not text:
        raise ValueError("an AE title must not be empty or all spaces")
    if len(text) > 16:
        raise ValueError(f"an AE title has at most 16 characters, got {len(text)}")
    bad = sorted({c for c in text if c == "\\" or not (" " <= c <= "~")})
    if bad:
        raise ValueError(f"an AE title may not contain {', '.join(repr(c) for c in bad)}")
    return text


def _check_host(value: str) -> str:
    text = value.strip()
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if len(text) > 253 or not re.fullmatch(rf"{label}(?:\.{label})*", text):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return text


def _check_url(value: str) -> str:
    from urllib.parse import urlsplit

    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return text.rstrip("/")


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Host = Annotated[str, AfterValidator(_check_host)]
Url = Annotated[str, AfterValidator(_check_url)]
#: lt=65536 so that the message reads "less than 65536", as in docs/node.md
Port = Annotated[int, Field(ge=1, lt=65536)]


def _check_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"{value!r}: use 1..64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError(f"{value!r}: must be auto, cpu, cuda or cuda:N")
    return value


#: destination, rule and pipeline names: used in job payloads, logs and folder names
Name = Annotated[str, AfterValidator(_check_name)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _names_once(field_name: str, entries, errors: list) -> dict[str, int]:
    """Each name of ``entries`` -> the index of its first entry; an error (appended to
    ``errors``, at ``field_name.i.name``) for every later entry of the same name."""
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in first:
            errors.append(((field_name, i, "name"),
                           f"{entry.name!r} is already the name of {field_name}.{first[entry.name]}"))
        first.setdefault(entry.name, i)
    return first


def _resolve(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)


# -- sections -------------------------------------------------------------------

class NodeSection(_Model):
    """The node's own DICOM identity and association limits."""

    ae_title: AETitle = "CTAI"
    host: Host = "0.0.0.0"
    port: Port = 11112
    #: concurrent associations accepted; more are refused (bounded resources)
    max_associations: int = Field(8, ge=1, le=256)
    acse_timeout_s: float = Field(30.0, gt=0, le=3600)
    dimse_timeout_s: float = Field(60.0, gt=0, le=3600)
    network_timeout_s: float = Field(60.0, gt=0, le=3600)


class TlsSection(_Model):
    """DICOM TLS: the node's certificate and key, and the CA that signs callers."""

    cert: Path
    key: Path
    ca: Optional[Path] = None
    require_client_cert: StrictBool = True

    @model_validator(mode="after")
    def _ca_for_clients(self) -> "TlsSection":
        if self.require_client_cert and self.ca is None:
            _raise_at("TlsSection", [(("ca",), "needed to verify client certificates "
                                              "(or set require_client_cert: false)")])
        return self

    def resolved(self, base: Path) -> "TlsSection":
        return self.model_copy(update={
            "cert": _resolve(self.cert, base),
            "key": _resolve(self.key, base),
            "ca": _resolve(self.ca, base) if self.ca is not None else None,
        })


class AllowedCaller(_Model):
    """A calling AE title (``*`` = any) and optionally the host it must call from."""

    ae_title: AETitle
    #: IP address or host name; compared as written (name resolution is the caller's job)
    host: Optional[Host] = None

    def matches(self, ae_title: str, host: str | None) -> bool:
        if self.ae_title != "*" and self.ae_title != ae_title.strip():
            return False
        return self.host is None or (host is not None and self.host == host.strip())


class StorageSection(_Model):
    """Where received instances, the index and results live."""

    root: Path = Path("./var")
    #: below this much free space the node answers C-STORE with 0xA700 (out of resources)
    min_free_mb: int = Field(2048, ge=0)
    #: true: success only once an instance is fsynced (survives a power cut); false: once it
    #: is written (survives a crash of the node, like Orthanc's default), about twice as fast
    fsync: bool = True
    #: at most this much received data in the spool (MB; results in the outbox not counted):
    #: C-STORE beyond it makes room (``retention.free_space_first``) or gets 0xA700; null = no quota
    max_spool_mb: Optional[float] = Field(None, gt=0)

    @property
    def spool_dir(self) -> Path:
        return self.root / "spool"

    @property
    def db_path(self) -> Path:
        return self.root / "node.db"

    @property
    def outbox_dir(self) -> Path:
        return self.root / "outbox"

    def resolved(self, base: Path) -> "StorageSection":
        return self.model_copy(update={"root": _resolve(self.root, base)})


class CompletenessSection(_Model):
    """When a series counts as complete: no new instance for ``quiet_time_s``."""

    quiet_time_s: float = Field(20.0, gt=0, le=3600)
    #: after the sender releases its association: wait this long for another association
    #: with more of the series (never longer than the quiet time)
    release_wait_s: float = Field(2.0, ge=0, le=3600)
    #: the same when the whole series (10 or more instances) came in the released association
    whole_series_release_wait_s: float = Field(0.5, ge=0, le=3600)
    check_interval_s: float = Field(2.0, gt=0, le=600)

    def release_wait(self, whole_series: bool) -> float:
        """The wait after an association release (``rules.completeness``)."""
        return self.whole_series_release_wait_s if whole_series else self.release_wait_s

    #: routing one complete series (reading its header, the rules) may take this long; then
    #: the series ends ``failed`` and the dispatcher goes on with the others
    route_timeout_s: float = Field(30.0, ge=1, le=3600)


class WorkersSection(_Model):
    #: analysis and delivery worker processes; 0: this node only receives and dispatches
    #: (workers run elsewhere: ``ct-ai-node worker``, docs/scale-out.md)
    count: int = Field(1, ge=0, le=64)
    #: a job whose worker stops renewing its lease for this long is run again
    lease_s: float = Field(120.0, ge=5, le=86400)
    #: a job still running after this long is failed for good (the analysis of one series
    #: must not hold a worker forever) and its worker process replaced
    job_timeout_s: float = Field(1800.0, ge=1, le=7 * 86400)
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    #: a worker on another host: the ingress node's web address (``http://ingress:8080``), from
    #: which it fetches each series over WADO-RS; null: read the series from this host's spool
    fetch_from: Optional[Url] = None
    #: the API token (role ``worker`` or ``admin``) the worker sends to ``fetch_from``
    fetch_token: Optional[SecretStr] = Field(None, repr=False)
    #: the workers that see this host's outbox (results are sent by them only); default host
    #: name + outbox folder. Set it where the host name changes (a container re-created).
    lane: Optional[Name] = None


QUEUE_KINDS = ("sqlite", "postgres")
#: rule priority -> the rank the queue orders by (lower first)
PRIORITIES = {"urgent": 0, "normal": 1, "background": 2}


class QueueSection(_Model):
    """Where jobs wait (docs/scale-out.md): the node's SQLite file (one host, the default) or
    a PostgreSQL server that ingress nodes and workers on several hosts share."""

    kind: Literal["sqlite", "postgres"] = "sqlite"
    #: postgres: ``postgresql://user@host:5432/db``; a password may come from PGPASSWORD or
    #: ~/.pgpass (libpq) rather than this file
    url: Optional[SecretStr] = Field(None, repr=False)
    #: a job that has waited this long is taken as if it were one priority level higher, so
    #: urgent work goes first and background work is never starved
    priority_aging_s: float = Field(600.0, gt=0, le=7 * 86400)
    #: how long a worker or the dispatcher waits for a database that went away before the
    #: operation fails (meanwhile the listener keeps receiving into the spool)
    reconnect_s: float = Field(300.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _url_for_postgres(self) -> "QueueSection":
        url = self.url.get_secret_value() if self.url is not None else ""
        if self.kind == "postgres" and not re.match(r"^postgres(ql)?://", url):
            _raise_at("QueueSection", [(("url",), "kind postgres needs url: postgresql://user@host:port/database")])
        if self.kind == "sqlite" and self.url is not None:
            _raise_at("QueueSection", [(("url",), "kind sqlite uses the node's own file (storage.root); remove url")])
        return self


class OrthancFeedSection(_Model):
    """Orthanc as the source without a plugin: the node follows Orthanc's ``/changes`` feed,
    pulls each stable series of ``modalities`` over REST into its spool (filed as sent by
    ``calling_ae``, which the rules may test) and remembers its position across restarts."""

    url: Url
    username: Optional[str] = None
    password: Optional[SecretStr] = Field(None, repr=False)
    #: how often the feed is read
    poll_s: float = Field(2.0, gt=0, le=3600)
    #: the series are filed as from this AE title (rules: ``calling_ae``)
    calling_ae: AETitle = "ORTHANC"
    #: only stable series of these modalities are pulled (not the results sent back)
    modalities: list[Annotated[str, Field(min_length=1, max_length=16)]] = ["CT"]
    #: on the very first start: ``now`` takes only series that become stable from then on;
    #: ``beginning`` goes through every change Orthanc still remembers
    start_at: Literal["now", "beginning"] = "now"


class RetrySection(_Model):
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_initial_s: float = Field(5.0, gt=0, le=86400)
    backoff_max_s: float = Field(300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _max_above_initial(self) -> "RetrySection":
        if self.backoff_max_s < self.backoff_initial_s:
            _raise_at("RetrySection", [(("backoff_max_s",), f"must be at least backoff_initial_s "
                                                           f"({self.backoff_initial_s:g})")])
        return self


class RetentionSection(_Model):
    """What the node deletes and when (docs/node.md, "Retention"). Undelivered work is never
    deleted to make room; only ``max_age_days`` ends it."""

    #: false: the node deletes nothing, neither on the timer nor to make room
    enabled: StrictBool = True
    #: a series whose every job is delivered (each destination acknowledged) or that no rule
    #: wanted is deleted with its outbox folders this many hours after that
    delivered_grace_h: float = Field(24.0, ge=0, le=24 * 3650)
    #: undelivered, failed or dead-lettered work (and a series that could not be routed) is kept
    #: until a requeue delivers it, or this many days after its last activity; null = forever
    max_age_days: Optional[float] = Field(30.0, gt=0, le=3650)
    interval_s: float = Field(300.0, ge=1, le=86400)
    #: before answering C-STORE with 0xA700, delete the oldest delivered series (grace or not)
    free_space_first: StrictBool = True

    @model_validator(mode="after")
    def _age_above_grace(self) -> "RetentionSection":
        if self.max_age_days is not None and self.max_age_days * 24 < self.delivered_grace_h:
            _raise_at("RetentionSection", [(("max_age_days",), f"must be at least delivered_grace_h "
                                                              f"({self.delivered_grace_h:g} h)")])
        return self


class PriorsSection(_Model):
    """Comparison with the patient's prior study (docs/reporting.md, "Comparison with the prior
    study"); each ``analyse`` rule says whether to compare (``prior``)."""

    #: a prior taken longer ago than this is not compared
    max_interval_days: float = Field(730.0, gt=0, le=36500)
    #: mixed into the patient key of the history (a SHA-256 of PatientID and issuer) so that the
    #: table alone does not let anyone test candidate IDs; every host of a node needs the same
    patient_key_salt: Optional[SecretStr] = Field(None, repr=False)
    #: the node forgets a study's findings this many days after analysing it; null = never
    history_days: Optional[float] = Field(3650.0, gt=0, le=36500)
    #: query the PACS: the DIMSE timeouts of the C-FIND and C-GET
    query_timeout_s: float = Field(60.0, gt=0, le=3600)
    #: query the PACS: the most instances a prior series may have to be retrieved
    max_prior_instances: int = Field(2000, ge=1, le=100000)


# -- destinations ---------------------------------------------------------------

class _Credentials(_Model):
    username: Optional[str] = None
    #: a secret: never in repr, logs or JSON dumps ("**********"); the egress unwraps it.
    #: Child processes get the config pickled (a pipe), not dumped, so they keep it.
    password: Optional[SecretStr] = Field(None, repr=False)

    @model_validator(mode="after")
    def _both_or_neither(self) -> "_Credentials":
        if (self.username is None) != (self.password is None):
            missing = "password" if self.password is None else "username"
            _raise_at(type(self).__name__, [((missing,), "username and password go together")])
        return self


class DestinationTls(_Model):
    """DICOM TLS to a destination: the CA that signed its certificate (null: the system's
    CAs), and the node's own certificate and key when the peer asks for one (most DICOM
    TLS peers do)."""

    ca: Optional[Path] = None
    cert: Optional[Path] = None
    key: Optional[Path] = None
    #: the peer's certificate must name the host it is reached at (as in ``host``)
    check_hostname: StrictBool = True

    @model_validator(mode="after")
    def _cert_with_key(self) -> "DestinationTls":
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            _raise_at("DestinationTls", [((missing,), "cert and key go together")])
        return self

    def resolved(self, base: Path) -> "DestinationTls":
        return self.model_copy(update={k: _resolve(v, base) for k in ("ca", "cert", "key")
                                       if (v := getattr(self, k)) is not None})

    def files(self) -> list[tuple[str, Path]]:
        return [(k, v) for k in ("ca", "cert", "key") if (v := getattr(self, k)) is not None]


class DicomDestination(_Model):
    """A DICOM peer reached by C-STORE (a PACS, Orthanc's DICOM port)."""

    name: Name
    kind: Literal["dicom"]
    host: Host
    port: Port
    ae_title: AETitle
    #: the AE title the node calls with; None = the node's own AE title
    calling_ae_title: Optional[AETitle] = None
    #: null: plain DICOM
    tls: Optional[DestinationTls] = None

    def calling_ae(self, node_ae_title: str) -> str:
        return self.calling_ae_title or node_ae_title


class StowDestination(_Credentials):
    """A DICOMweb server reached by STOW-RS (``url`` is the DICOMweb root)."""

    name: Name
    kind: Literal["stow"]
    url: Url
    timeout_s: float = Field(60.0, gt=0, le=3600)


class OrthancDestination(_Credentials):
    """An Orthanc server reached through its REST API."""

    name: Name
    kind: Literal["orthanc"]
    url: Url


class FhirDestination(_Credentials):
    """A FHIR server that takes the result as a DiagnosticReport (JSON), for sites that
    integrate results that way: ``POST {url}/DiagnosticReport`` as a conditional create
    (egress/fhir.py). ``url`` is the FHIR base URL; ``token`` (a secret) is sent as
    ``Authorization: Bearer``, username/password as basic authentication."""

    name: Name
    kind: Literal["fhir"]
    url: Url
    token: Optional[SecretStr] = Field(None, repr=False)
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_authentication(self) -> "FhirDestination":
        if self.token is not None and self.username is not None:
            _raise_at("FhirDestination", [(("token",), "token or username/password, not both")])
        return self


Destination = Annotated[
    Union[DicomDestination, StowDestination, OrthancDestination, FhirDestination], Field(discriminator="kind")
]


# -- notifications --------------------------------------------------------------

#: what a notification can be about (a job's outcome; see node/notifier.py)
NOTIFY_EVENTS = ("delivered", "not_analysed", "failed", "dead")


class SmtpServer(_Credentials):
    """The mail server notifications are sent through."""

    host: Host
    port: Port = 25
    #: STARTTLS after connecting (port 587); ``ssl``: TLS from the start (port 465)
    starttls: StrictBool = False
    ssl: StrictBool = False


def _check_address(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", text):
        raise ValueError(f"{value!r} is not an e-mail address")
    return text


Email = Annotated[str, AfterValidator(_check_address)]


class Notification(_Model):
    """A message (webhook JSON POST or e-mail) when a job ends in one of ``events``."""

    name: Name
    kind: Literal["webhook", "email"]
    events: list[Literal["delivered", "not_analysed", "failed", "dead"]] = list(NOTIFY_EVENTS)
    #: only jobs of these rules; empty: every rule
    rules: list[Name] = []
    #: the message text; placeholders in braces (docs/node.md); patient data only if named
    template: Optional[str] = Field(None, max_length=4000)
    url: Optional[Url] = None  # webhook
    smtp: Optional[SmtpServer] = None  # email
    sender: Optional[Email] = None  # email: From
    to: list[Email] = []  # email: To
    subject: str = Field("ct-ai-node {node}: {event_text} (job {job_id})", max_length=300)

    @model_validator(mode="after")
    def _kind_fields(self) -> "Notification":
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if self.kind == "webhook" and self.url is None:
            errors.append((("url",), "a webhook needs the URL to POST to"))
        if self.kind == "email":
            for name, value in (("smtp", self.smtp), ("sender", self.sender)):
                if value is None:
                    errors.append(((name,), "an e-mail notification needs it"))
            if not self.to:
                errors.append((("to",), "an e-mail notification needs at least one address"))
        if errors:
            _raise_at("Notification", errors)
        return self


# -- rules ----------------------------------------------------------------------

def _scalar(value: Any) -> Any:
    # YAML reads yes/no/on/off as booleans: a rule comparing with "NO" must quote it
    if isinstance(value, bool):
        raise ValueError("YAML read this as true/false; quote the value (\"YES\", \"NO\", \"ON\", \"OFF\")")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a text or a number, got {type(value).__name__}")
    return value


Scalar = Annotated[Any, AfterValidator(_scalar)]


class _Operators(_Model):
    """The comparison operators a condition may use (exactly one per condition)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    equals: Optional[Scalar] = None
    in_: Optional[list[Scalar]] = Field(None, alias="in", min_length=1)
    regex: Optional[str] = None
    range: Optional[tuple[float, float]] = None
    exists: Optional[StrictBool] = None
    contains: Optional[Scalar] = None

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @field_validator("range")
    @classmethod
    def _range_ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None:
            lo, hi = value
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("bounds must be finite numbers")
            if lo > hi:
                raise ValueError(f"lower bound {lo:g} is above upper bound {hi:g}")
        return value

    def _given(self) -> list[str]:
        names = {"in_": "in"}
        return [names.get(f, f) for f in type(self).model_fields
                if f in _OPERATOR_FIELDS and getattr(self, f) is not None]

    @property
    def operator(self) -> tuple[str, Any]:
        """(operator name, value) of the one operator set."""
        name = self._given()[0]
        return name, getattr(self, "in_" if name == "in" else name)


_OPERATOR_FIELDS = ("equals", "in_", "regex", "range", "exists", "contains")


def _one_operator(model: _Operators, title: str) -> None:
    given = model._given()
    if len(given) != 1:
        found = f"found {len(given)}: {', '.join(given)}" if given else "found none"
        _raise_at(title, [((), f"a condition needs exactly one operator ({', '.join(OPERATORS)}); {found}")])


class Comparison(_Operators):
    """An operator applied to a series fact: ``{in: [PACS]}``."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "Comparison":
        _one_operator(self, "Comparison")
        return self


class Condition(_Operators):
    """One condition of a rule.

    Two spellings, as in docs/node.md:

    - a DICOM attribute by keyword, operator beside it: ``{tag: Modality, equals: CT}``;
    - a fact of the series or its association, operator nested:
      ``{calling_ae: {in: [PACS]}}``, ``{instances: {range: [20, 2000]}}``,
      ``{image_type: {contains: AXIAL}}``, ``{orientation: {equals: axial}}``.
    """

    tag: Optional[str] = None
    calling_ae: Optional[Comparison] = None
    called_ae: Optional[Comparison] = None
    instances: Optional[Comparison] = None
    image_type: Optional[Comparison] = None
    orientation: Optional[Comparison] = None

    @field_validator("tag")
    @classmethod
    def _known_keyword(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from pydicom import datadict

        keyword = value.strip()
        if datadict.tag_for_keyword(keyword) is None:
            close = difflib.get_close_matches(keyword, list(datadict.keyword_dict), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{value!r} is not a DICOM keyword{hint}")
        if set(datadict.dictionary_VR(datadict.tag_for_keyword(keyword)).split(" or ")) & _BULK_VRS:
            raise ValueError(f"{keyword} is a sequence or binary data; rules see plain values only")
        return keyword

    @model_validator(mode="after")
    def _one_target_one_operator(self) -> "Condition":
        targets = (["tag"] if self.tag is not None else []) + [
            t for t in FACT_TARGETS if getattr(self, t) is not None
        ]
        if len(targets) != 1:
            found = f"found {', '.join(targets)}" if targets else "found none"
            _raise_at("Condition", [((), "a condition tests exactly one of tag, "
                                         f"{', '.join(FACT_TARGETS)}; {found}")])
        if self.tag is not None:
            _one_operator(self, "Condition")
        else:
            given = self._given()
            if given:
                _raise_at("Condition", [((given[0],), f"goes inside the {targets[0]} block: "
                                                      f"{{{targets[0]}: {{{given[0]}: ...}}}}")])
        if self.orientation is not None:
            name, value = self.orientation.operator
            values = value if isinstance(value, list) else [value]
            if name in ("equals", "in", "contains"):
                wrong = [v for v in values if str(v).strip() not in ORIENTATIONS]
                if wrong:
                    _raise_at("Condition", [(("orientation", name), f"{wrong[0]!r} is not one of "
                                                                   f"{', '.join(ORIENTATIONS)}")])
        return self

    @property
    def target(self) -> str:
        """``tag`` or one of ``FACT_TARGETS``."""
        if self.tag is not None:
            return "tag"
        return next(t for t in FACT_TARGETS if getattr(self, t) is not None)

    @property
    def subject(self) -> str:
        """What the condition looks at, for explanations: the keyword or the fact name."""
        return self.tag if self.tag is not None else self.target

    @property
    def test(self) -> tuple[str, Any]:
        """(operator, value) of this condition."""
        if self.tag is not None:
            return self.operator
        return getattr(self, self.target).operator


def _normalise_action(data: Any) -> Any:
    # "analyze" (US spelling) is accepted and stored as "analyse"
    if isinstance(data, dict) and data.get("action") == "analyze":
        data = {**data, "action": "analyse"}
    return data


class ActionSpec(_Model):
    """What to do with a series: analyse it, forward it, or discard it."""

    action: Literal["analyse", "forward", "discard"] = "discard"
    #: analyse only; default ``DEFAULT_PIPELINE``
    pipeline: Optional[Name] = None
    #: analyse only: lung segmentation method; default ``DEFAULT_LUNGS``
    lungs: Optional[Literal["unet", "classical"]] = None
    #: analyse: where the results go; forward: where the series goes
    destinations: list[Name] = []
    #: analyse only: a series refused by the analysis, or whose analysis fails for good,
    #: gets an "AI analysis not performed: <reason>" SC + SR at the destinations; default true
    notify_not_analysed: Optional[StrictBool] = None
    #: urgent work (an emergency department) is taken before normal, normal before
    #: background (a retrospective batch); waiting raises a job's rank (queue.priority_aging_s)
    priority: Literal["urgent", "normal", "background"] = "normal"
    #: analyse only: compare with the patient's prior study - off; history: a study this node
    #: analysed before; query: also ask ``prior_source`` (C-FIND) and retrieve (C-GET) and
    #: analyse a prior it holds. Default history
    prior: Optional[Literal["off", "history", "query"]] = None
    #: analyse with prior query: the destination asked for priors - kind dicom (C-FIND, C-GET)
    #: or stow (its DICOMweb root: QIDO-RS, WADO-RS)
    prior_source: Optional[Name] = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_action(cls, data: Any) -> Any:
        data = _normalise_action(data)
        if isinstance(data, dict) and data.get("action") == "analyse":
            data = dict(data)
            if data.get("pipeline") is None:
                data["pipeline"] = DEFAULT_PIPELINE
            if data.get("lungs") is None:
                data["lungs"] = DEFAULT_LUNGS
            if data.get("notify_not_analysed") is None:
                data["notify_not_analysed"] = True
            if data.get("prior") is None:
                data["prior"] = "history"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ActionSpec":
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if self.action != "analyse":
            for field in ("pipeline", "lungs", "notify_not_analysed", "prior", "prior_source"):
                if getattr(self, field) is not None:
                    errors.append(((field,), f"only for action analyse, not {self.action}"))
        if self.prior == "query" and self.prior_source is None:
            errors.append((("prior_source",), "prior query needs the destination to ask (prior_source)"))
        if self.prior_source is not None and self.prior != "query":
            errors.append((("prior_source",), f"only with prior: query, not {self.prior}"))
        if self.action == "forward" and not self.destinations:
            errors.append((("destinations",), "a forward rule needs at least one destination"))
        if self.action == "discard" and self.destinations:
            errors.append((("destinations",), "a discard rule sends nothing; remove its destinations"))
        seen: set[str] = set()
        for i, name in enumerate(self.destinations):
            if name in seen:
                errors.append((("destinations", i), f"{name!r} is named twice"))
            seen.add(name)
        if errors:
            _raise_at(type(self).__name__, errors)
        return self


class Rule(ActionSpec):
    """A named rule: when every condition holds, take the action."""

    name: Name
    #: all must hold; an empty list matches every series
    when: list[Condition] = []
    action: Literal["analyse", "forward", "discard"]


class RoutingSection(_Model):
    #: first: the first matching rule wins; all: every matching rule acts
    mode: Literal["first", "all"] = "first"
    #: what happens to a series no rule matches
    fallback: ActionSpec = ActionSpec(action="discard")


# -- the whole file -------------------------------------------------------------

ROLES = ("admin", "viewer", "sender", "worker")


def _check_secret_hash(value: SecretStr) -> SecretStr:
    text = value.get_secret_value()
    if not re.fullmatch(r"\$argon2id?\$[^\s]+|sha256:[0-9a-f]{64}", text):
        raise ValueError("not a hash made by `ct-ai-node web hash-password` (argon2) or "
                         "`ct-ai-node web new-token` (sha256:...); never the password or token itself")
    return value


SecretHash = Annotated[SecretStr, AfterValidator(_check_secret_hash)]


class WebUser(_Model):
    """Someone who may log in to the web app: ``admin`` changes things, ``viewer`` looks,
    ``sender`` only sends images (STOW-RS, with HTTP Basic authentication)."""

    name: Name
    role: Literal["admin", "viewer", "sender"] = "viewer"
    #: argon2 hash (``ct-ai-node web hash-password``); never the password itself
    password_hash: SecretHash = Field(repr=False)


class ApiToken(_Model):
    """A bearer token for scripts (``Authorization: Bearer <token>``), with a role
    (``sender``: a PACS or modality that sends images by STOW-RS, nothing else; ``worker``: a
    worker on another host that fetches series by WADO-RS, nothing else)."""

    name: Name
    role: Literal["admin", "viewer", "sender", "worker"] = "viewer"
    #: ``sha256:<hex>`` of the token (``ct-ai-node web new-token`` prints both)
    token_hash: SecretHash = Field(repr=False)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebSection(_Model):
    """The administrator's web app and its JSON API (``/``, ``/api``), ``/metrics``,
    ``/healthz``. Without users it is open to anyone who can reach it, so it must then be
    bound to a loopback address (this machine only) and says so on every page."""

    host: Host = "127.0.0.1"
    port: Port = 8080
    users: list[WebUser] = []
    api_tokens: list[ApiToken] = []
    #: signs the session cookies; null: a random key kept in the storage root (web.key)
    session_secret: Optional[SecretStr] = Field(None, repr=False, min_length=16)
    #: log-in sessions end after this long without a request
    session_max_age_h: float = Field(12.0, gt=0, le=24 * 30)
    #: the largest STOW-RS request accepted (HTTP 413 above)
    stow_max_mb: float = Field(4096.0, gt=0, le=65536)
    #: a viewer's address for a study, ``{study}`` standing for its Study Instance UID
    #: (OHIF: ``http://HOST:3000/viewer?StudyInstanceUIDs={study}``); job pages link to it
    viewer_url: Optional[Url] = None

    @property
    def open(self) -> bool:
        """No users and no tokens: everyone who can reach it is an administrator."""
        return not self.users and not self.api_tokens

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> "WebSection":
        errors: list[tuple[tuple[str | int, ...], str]] = []
        if self.open and not _is_loopback(self.host):
            errors.append((("users",), f"needed when host is {self.host!r}: without users the web app is open to "
                                       "anyone who reaches it, so it only binds to 127.0.0.1 (or ::1)"))
        for field_name, entries in (("users", self.users), ("api_tokens", self.api_tokens)):
            _names_once(field_name, entries, errors)
        if errors:
            _raise_at("WebSection", errors)
        return self


class NodeConfig(_Model):
    """The node's configuration (docs/node.md), one attribute per YAML section."""

    node: NodeSection = NodeSection()
    tls: Optional[TlsSection] = None
    #: empty = anyone may call
    allowed_callers: list[AllowedCaller] = []
    storage: StorageSection = StorageSection()
    completeness: CompletenessSection = CompletenessSection()
    workers: WorkersSection = WorkersSection()
    queue: QueueSection = QueueSection()
    retry: RetrySection = RetrySection()
    retention: RetentionSection = RetentionSection()
    priors: PriorsSection = PriorsSection()
    destinations: list[Destination] = []
    routing: RoutingSection = RoutingSection()
    rules: list[Rule] = []
    notifications: list[Notification] = []
    #: null = no Orthanc feed; else the node follows that Orthanc's /changes (docs/scale-out.md)
    orthanc_feed: Optional[OrthancFeedSection] = None
    #: null = no web app; ``status:`` (the read-only page before the web app) is read as ``web:``
    web: Optional[WebSection] = Field(None, validation_alias=AliasChoices("web", "status"))

    @model_validator(mode="after")
    def _cross_references(self) -> "NodeConfig":
        errors: list[tuple[tuple[str | int, ...], str]] = []
        known = _names_once("destinations", self.destinations, errors)
        names = _names_once("rules", self.rules, errors)
        _names_once("notifications", self.notifications, errors)
        for i, note in enumerate(self.notifications):
            for j, rule in enumerate(note.rules):
                if rule not in names:
                    errors.append((("notifications", i, "rules", j),
                                   f"unknown rule {rule!r} (rules: {', '.join(names) or 'none defined'})"))
        listed = ", ".join(known) if known else "none defined"
        targets: list[tuple[tuple[str | int, ...], ActionSpec]] = [
            (("rules", i), rule) for i, rule in enumerate(self.rules)
        ] + [(("routing", "fallback"), self.routing.fallback)]
        for loc, spec in targets:
            for j, name in enumerate(spec.destinations):
                if name not in known:
                    errors.append(((*loc, "destinations", j), f"unknown destination {name!r} (destinations: {listed})"))
            if spec.prior_source is not None:
                askable = [d.name for d in self.destinations if d.kind in PRIOR_SOURCE_KINDS]
                if spec.prior_source not in askable:
                    errors.append(((*loc, "prior_source"), f"{spec.prior_source!r} is not a destination of kind dicom "
                                                           f"or stow (those: {', '.join(askable) or 'none defined'})"))
        if errors:
            _raise_at("NodeConfig", errors)
        return self

    def destination(self, name: str) -> DicomDestination | StowDestination | OrthancDestination:
        """The destination called ``name`` (KeyError when there is none)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def notification(self, name: str) -> Notification:
        """The notification called ``name`` (KeyError when there is none)."""
        for note in self.notifications:
            if note.name == name:
                return note
        raise KeyError(name)

    def caller_allowed(self, ae_title: str, host: str | None = None) -> bool:
        """Whether a calling AE title (from ``host``) may associate; anyone when the list is empty."""
        return not self.allowed_callers or any(c.matches(ae_title, host) for c in self.allowed_callers)

    def resolved(self, base: Path | None = None) -> "NodeConfig":
        """A copy whose relative paths (storage root, TLS files) are made absolute against ``base`` (CWD)."""
        base = Path.cwd() if base is None else Path(base)
        update: dict[str, Any] = {"storage": self.storage.resolved(base)}
        if self.tls is not None:
            update["tls"] = self.tls.resolved(base)
        if any(getattr(d, "tls", None) is not None for d in self.destinations):
            update["destinations"] = [d.model_copy(update={"tls": d.tls.resolved(base)})
                                      if getattr(d, "tls", None) is not None else d for d in self.destinations]
        return self.model_copy(update=update)

    def summary(self) -> str:
        """One line for humans: AE title, port, destinations and rules."""
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"

        tls = ", TLS" if self.tls is not None else ""
        return (f"AE title {self.node.ae_title}, port {self.node.port}{tls}, "
                f"{count(len(self.destinations), 'destination')}, {count(len(self.rules), 'rule')}")


# -- loading --------------------------------------------------------------------

def _loc_text(loc: tuple[str | int, ...]) -> str:
    parts = list(loc)
    # discriminated unions add the kind to the path (destinations.0.dicom.port): drop it
    if len(parts) >= 3 and parts[0] == "destinations" and isinstance(parts[1], int) and parts[2] in DESTINATION_KINDS:
        del parts[2]
    return ".".join(str(p) for p in parts)


def problems_of(exc: ValidationError) -> list[str]:
    """``dotted.path: message`` lines of a pydantic ValidationError."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc, msg, kind = tuple(error["loc"]), error["msg"], error["type"]
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "union_tag_invalid":
            loc = (*loc, "kind")
            msg = f"must be one of {', '.join(DESTINATION_KINDS)}, got {error['ctx'].get('tag')!r}"
        elif kind == "union_tag_not_found":
            loc = (*loc, "kind")
            msg = f"Field required ({', '.join(DESTINATION_KINDS)})"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{_loc_text(loc) or '(top level)'}: {msg}")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: PyYAML reports it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"yaml{where}: {' '.join(str(problem).split())}"


def parse_config(data: Any, source: str | None = None) -> NodeConfig:
    """Validate already-parsed YAML/JSON data; ``ConfigError`` when it is wrong."""
    if not isinstance(data, dict):
        got = "nothing (empty file)" if data is None else type(data).__name__
        raise ConfigError([f"(top level): expected a mapping of sections (node, storage, rules, ...), got {got}"],
                          source)
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_of(exc), source) from None


#: sections whose change needs the node restarted (sockets, processes, files); the web app
#: never edits them, so they may take values from the environment (``expand_environment``)
RESTART_SECTIONS = ("node", "tls", "storage", "workers", "queue", "web", "completeness", "retry", "retention",
                    "orthanc_feed")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(data: Any, environ: dict[str, str]) -> tuple[Any, list[str]]:
    """``${NAME}`` in a string of a ``RESTART_SECTIONS`` section becomes the environment
    variable NAME (for secrets and per-host values in containers: tokens, database URLs).
    Not in the sections the web app edits: saving one there would write the value into the
    file. Returns (data, one problem line per variable that is not set)."""
    problems: list[str] = []

    def walk(value: Any, loc: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{loc}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{loc}.{i}") for i, v in enumerate(value)]
        if isinstance(value, str):
            def sub(match: re.Match) -> str:
                name = match.group(1)
                if name not in environ:
                    problems.append(f"{loc}: environment variable {name} is not set")
                    return ""
                return environ[name]

            return _ENV_REF.sub(sub, value)
        return value

    if not isinstance(data, dict):
        return data, problems
    out = {k: walk(v, k) if k in RESTART_SECTIONS else v for k, v in data.items()}
    return out, problems


def load_config(path: str | Path, base: Path | None = None, check_files: bool = True) -> NodeConfig:
    """Read, validate and resolve a YAML configuration file.

    Relative paths are made absolute against ``base`` (default: the current
    working directory). With ``check_files`` the TLS files must exist.

    Raises
    ------
    ConfigError
        With one ``dotted.field.path: message`` line per problem: a missing or
        unreadable file, a YAML syntax error (with its line), wrong fields.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file: {path} not found"], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"file: {path} cannot be read ({type(exc).__name__})"], source) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    import os

    data, unset = expand_environment(data, dict(os.environ))
    if unset:
        raise ConfigError(unset, source)
    config = parse_config(data, source).resolved(base)
    if check_files:
        missing = []
        if config.tls is not None:
            missing += [f"tls.{name}: file {p} not found" for name in ("cert", "key", "ca")
                        if (p := getattr(config.tls, name)) is not None and not p.is_file()]
        for i, dest in enumerate(config.destinations):
            if getattr(dest, "tls", None) is not None:
                missing += [f"destinations.{i}.tls.{name}: file {p} not found" for name, p in dest.tls.files()
                            if not p.is_file()]
        if missing:
            raise ConfigError(missing, source)
    return config


def default_config(**overrides: Any) -> NodeConfig:
    """The embedded configuration (for ``ct-ai-node demo``), with sections replaced by ``overrides``.

    AE title CTAI on port 11112, anyone may call, storage ``./var`` (relative:
    call ``.resolved()``), one rule ``ct`` that analyses every CT series with the
    default pipeline and sends the results to every destination given (none by
    default). ``overrides`` are top-level sections as dicts or models, e.g.
    ``default_config(destinations=[{...}], storage={"root": "/tmp/node"})``.
    """
    unknown = sorted(set(overrides) - set(NodeConfig.model_fields))
    if unknown:
        raise ConfigError([f"{name}: unknown field" for name in unknown], "default_config")

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(by_alias=True, exclude_none=False)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    data: dict[str, Any] = {k: plain(v) for k, v in overrides.items()}
    if "rules" not in data:
        names = [d["name"] for d in data.get("destinations", []) if isinstance(d, dict) and "name" in d]
        data["rules"] = [{
            "name": "ct",
            "when": [{"tag": "Modality", "equals": "CT"}],
            "action": "analyse",
            "pipeline": DEFAULT_PIPELINE,
            "lungs": DEFAULT_LUNGS,
            "destinations": names,
        }]
    return parse_config(data, "default_config")


__all__ = [
    "ActionSpec",
    "AllowedCaller",
    "CompletenessSection",
    "Condition",
    "ConfigError",
    "DEFAULT_LUNGS",
    "DEFAULT_PIPELINE",
    "Destination",
    "DicomDestination",
    "FhirDestination",
    "NodeConfig",
    "NodeSection",
    "OrthancDestination",
    "RetentionSection",
    "RetrySection",
    "RoutingSection",
    "Rule",
    "StorageSection",
    "StowDestination",
    "Comparison",
    "TlsSection",
    "WorkersSection",
    "default_config",
    "load_config",
    "parse_config",
    "problems_of",
]
