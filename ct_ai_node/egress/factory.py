"""``destination_from_config``: a Destination from one ``destinations`` entry.

Duck-typed on purpose: any object with the attributes of docs/node.md (the pydantic
config model, a SimpleNamespace in tests) or a plain mapping with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ct_ai_node.egress.base import Destination
from ct_ai_node.egress.dicom import DicomDestination, client_tls
from ct_ai_node.egress.fhir import FhirDestination
from ct_ai_node.egress.orthanc import OrthancDestination
from ct_ai_node.egress.stow import StowDestination

_MISSING = object()


def _field(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
    if value is _MISSING or (value is None and default is _MISSING):
        raise ValueError(f"destination {_name(cfg)!r}: missing field {name!r}")
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr
        value = value.get_secret_value()
    return value


def _name(cfg: Any) -> str:
    return str(cfg.get("name", "?") if isinstance(cfg, Mapping) else getattr(cfg, "name", "?"))


def destination_from_config(cfg: Any) -> Destination:
    kind = _field(cfg, "kind")
    name, kind = str(_field(cfg, "name")), str(getattr(kind, "value", kind)).lower()  # str or Enum
    timeout = _field(cfg, "timeout_s", None)
    extra = {} if timeout is None else {"timeout_s": float(timeout)}
    if kind == "dicom":
        calling = _field(cfg, "calling_ae_title", None)
        if calling:
            extra["calling_ae_title"] = calling
        max_pdu = _field(cfg, "max_pdu", None)
        if max_pdu is not None:
            extra["max_pdu"] = int(max_pdu)
        tls = _field(cfg, "tls", None)
        if tls is not None:
            extra["tls"] = client_tls(_field(tls, "ca", None), _field(tls, "cert", None), _field(tls, "key", None),
                                      bool(_field(tls, "check_hostname", True)))
        return DicomDestination(name, str(_field(cfg, "host")), int(_field(cfg, "port")),
                                str(_field(cfg, "ae_title")), **extra)
    if kind in ("stow", "orthanc"):
        cls = StowDestination if kind == "stow" else OrthancDestination
        return cls(name, str(_field(cfg, "url")), username=_field(cfg, "username", None),
                   password=_field(cfg, "password", None), **extra)
    if kind == "fhir":
        return FhirDestination(name, str(_field(cfg, "url")), username=_field(cfg, "username", None),
                               password=_field(cfg, "password", None), token=_field(cfg, "token", None), **extra)
    raise ValueError(f"destination {name!r}: unknown kind {kind!r} (dicom, stow, orthanc or fhir)")
