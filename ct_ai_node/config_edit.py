"""Editing one section of the node's configuration (the web app's configuration page).

Pure: YAML text and plain data in, plain data, ``NodeConfig`` or ``ConfigError`` out. The
candidate is the configuration file's data with one section replaced, validated by the
same ``parse_config`` as ``ct-ai-node check-config``, so the messages are the same. Secrets
never leave: passwords (and a fhir destination's ``token``) are shown as ``MASK``, and a
``MASK`` saved back keeps the secret the same-named destination had.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from ct_ai_node import config
from ct_ai_node.config import ConfigError, NodeConfig, _UniqueKeyLoader, _yaml_problem, parse_config

#: the sections applied as soon as they are saved (no restart)
LIVE_SECTIONS = ("allowed_callers", "destinations", "rules", "routing", "notifications")
#: sections whose change needs the node restarted (sockets, processes, files)
RESTART_SECTIONS = config.RESTART_SECTIONS
#: the sections the web app edits: the live ones, and the node's DICOM identity (saved to the
#: file, in force after the next restart)
EDITABLE_SECTIONS = (*LIVE_SECTIONS, "node")
MASK = "**********"
#: keys whose values are secrets: masked in the editor, restored when saved back masked
SECRET_KEYS = ("password", "token")
_EMPTY = {"allowed_callers": [], "destinations": [], "rules": [], "routing": {}, "notifications": [], "node": {}}


def check_section_name(section: str) -> None:
    if section not in EDITABLE_SECTIONS:
        raise ConfigError([f"{section}: not an editable section (one of {', '.join(EDITABLE_SECTIONS)})"])


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (MASK if k in SECRET_KEYS and v is not None else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def section_text(file_data: dict, section: str) -> str:
    """The section as YAML for the editor, passwords masked (empty list/mapping when absent)."""
    check_section_name(section)
    value = file_data.get(section)
    if value is None:
        value = _EMPTY[section]
    text = yaml.safe_dump(_masked(value), sort_keys=False, allow_unicode=True, width=100)
    return "" if text.strip() in ("[]", "{}") else text


def parse_section(text: str, section: str) -> Any:
    """The editor's YAML text as plain data (an empty text is an empty section)."""
    check_section_name(section)
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"{section}: {_yaml_problem(exc)}"]) from None
    return copy.deepcopy(_EMPTY[section]) if value is None else value


def _unmask(new: Any, old: Any, section: str) -> Any:
    """``new`` entries with each ``MASK`` password (also one level down: a notification's
    ``smtp``) replaced by the password of the entry of the same name in ``old``; a mask
    with no saved password is an error."""
    if not isinstance(new, list):
        return new
    before = {d.get("name"): d for d in old or [] if isinstance(d, dict)}
    out, problems = [], []
    for i, entry in enumerate(new):
        if isinstance(entry, dict):
            saved = before.get(entry.get("name"), {})
            entry = dict(entry)
            for path in (("password",), ("token",), ("smtp", "password")):
                holder, saved_holder = entry, saved
                for key in path[:-1]:
                    holder = holder.get(key) if isinstance(holder, dict) else None
                    saved_holder = saved_holder.get(key) if isinstance(saved_holder, dict) else None
                if not isinstance(holder, dict) or holder.get(path[-1]) != MASK:
                    continue
                known = saved_holder.get(path[-1]) if isinstance(saved_holder, dict) else None
                if known is None:
                    problems.append(f"{section}.{i}.{'.'.join(path)}: type the {path[-1]} (no saved one for "
                                    f"{entry.get('name')!r})")
                if len(path) == 1:
                    entry[path[0]] = known
                else:
                    entry[path[0]] = {**holder, path[-1]: known}
        out.append(entry)
    if problems:
        raise ConfigError(problems)
    return out


def with_section(file_data: dict, section: str, value: Any) -> dict:
    """The configuration file's data with ``section`` replaced by ``value`` (masked
    passwords restored)."""
    check_section_name(section)
    if section in ("destinations", "notifications"):
        value = _unmask(value, file_data.get(section), section)
    data = dict(file_data)
    data[section] = value
    return data


def validate(data: dict, base=None, environ: dict[str, str] | None = None) -> NodeConfig:
    """``parse_config`` (the messages of check-config), resolved against ``base``, with
    ``${NAME}`` in the restart sections taken from ``environ`` (default the process's), as
    ``load_config`` does; ``data`` itself (what is written back) keeps the references."""
    import os

    expanded, unset = config.expand_environment(data, dict(os.environ) if environ is None else environ)
    if unset:
        raise ConfigError(unset)
    return parse_config(expanded).resolved(base)


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The sections that differ between ``old`` and ``new`` and need a restart."""
    return [s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]


def live_part(in_force: NodeConfig, saved: NodeConfig) -> NodeConfig:
    """What can be applied now: ``in_force`` with the live sections of ``saved``."""
    return in_force.model_copy(update={s: getattr(saved, s) for s in LIVE_SECTIONS})


def _names(items: Any) -> dict[str, Any]:
    return {str(x.get("name")): x for x in items or [] if isinstance(x, dict)} if isinstance(items, list) else {}


def describe_change(section: str, old: Any, new: Any) -> str:
    """One line for the audit log: what was added, changed and removed (by name where the
    entries have names), never a password."""
    if section in ("destinations", "rules", "notifications"):
        a, b = _names(old), _names(new)
        parts = [f"added {', '.join(sorted(set(b) - set(a)))}" if set(b) - set(a) else "",
                 f"removed {', '.join(sorted(set(a) - set(b)))}" if set(a) - set(b) else "",
                 ("changed " + ", ".join(sorted(n for n in set(a) & set(b) if a[n] != b[n])))
                 if any(a[n] != b[n] for n in set(a) & set(b)) else ""]
        order = [str(x.get("name")) for x in new or [] if isinstance(x, dict)]
        if not any(parts) and order != [str(x.get("name")) for x in old or [] if isinstance(x, dict)]:
            parts.append("new order " + ", ".join(order))
        text = "; ".join(p for p in parts if p)
        return f"{section}: {text or 'no change'}"
    if section == "allowed_callers":
        def show(items):
            return ", ".join(f"{c.get('ae_title')}@{c.get('host') or '*'}" for c in items or []
                             if isinstance(c, dict)) or "anyone"
        return f"allowed_callers: {show(old)} -> {show(new)}"
    return f"{section}: {'no change' if old == new else 'changed'}"
