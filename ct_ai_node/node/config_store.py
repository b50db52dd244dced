"""The node's configuration file, edited from the web app: validated, saved atomically with
its comments kept (outside the edited section), then applied without a restart.

The edge around :mod:`ct_ai_node.config_edit` (pure): reading and writing the YAML file.
"""

from __future__ import annotations

import re
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import yaml

from ct_ai_node.config import ConfigError, NodeConfig, _UniqueKeyLoader, _yaml_problem
from ct_ai_node.config_edit import (
    describe_change,
    live_part,
    parse_section,
    restart_needed,
    section_text,
    validate,
    with_section,
)


class ConfigStore:
    """``path``: the file the node was started with; ``base``: the folder its relative paths
    were resolved against; ``apply``: what makes a saved configuration take effect (the
    node's ``reconfigure``)."""

    def __init__(self, path: Path, base: Path, current: NodeConfig, apply: Callable[[NodeConfig], None]):
        self.path = Path(path)
        self.base = Path(base)
        self.current = current
        self._apply = apply
        self._lock = threading.Lock()

    def file_data(self) -> dict:
        try:
            data = yaml.load(self.path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
        except yaml.YAMLError as exc:
            raise ConfigError([_yaml_problem(exc)], str(self.path)) from None
        except OSError as exc:
            raise ConfigError([f"file: {self.path} cannot be read ({type(exc).__name__})"], str(self.path)) from None
        return data if isinstance(data, dict) else {}

    def section_text(self, section: str) -> str:
        return section_text(self.file_data(), section)

    def check(self, section: str, text: str) -> tuple[NodeConfig, dict, Any]:
        """The configuration the file would hold with the edited section (ConfigError with
        check-config's messages otherwise), the file data it comes from, and the section's
        new value."""
        data = self.file_data()
        value = parse_section(text, section)
        new_data = with_section(data, section, value)
        return validate(new_data, self.base), data, new_data[section]

    def pending_restart(self) -> list[str]:
        """Sections saved in the file that the node applies only when restarted."""
        try:
            return restart_needed(self.current, validate(self.file_data(), self.base))
        except ConfigError:
            return []

    def save(self, section: str, text: str) -> tuple[NodeConfig, str]:
        """Validate, write the file atomically (the other sections and their comments as they
        were), apply what can be applied now (the live sections). Returns the configuration
        in force and a one-line summary for the audit log."""
        with self._lock:
            saved, data, value = self.check(section, text)
            summary = describe_change(section, data.get(section), value)
            self._write_section(section, value)
            config = live_part(self.current, saved)
            if config != self.current:
                self._apply(config)
                self.current = config
            later = restart_needed(self.current, saved)
            if later:
                summary += f" (saved; {', '.join(later)}: in force after the node's next restart)"
        return config, summary

    def _write_section(self, section: str, value: Any) -> None:
        text = self.path.read_text(encoding="utf-8")
        new_text = splice_section(text, section, value)
        mode = self.path.stat().st_mode & 0o777
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(new_text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def splice_section(text: str, section: str, value: Any) -> str:
    """``text`` with the top-level ``section`` (its key line and its indented or ``-`` lines)
    replaced by ``value`` in block YAML. Everything else, comments included, stays as it
    was; comment lines right after the section stay with what follows. Checked by reading
    the result back: the section is ``value`` and every other section is unchanged."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    block = yaml.safe_dump({section: value}, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    key = re.compile(rf"^{re.escape(section)}\s*:")
    start = next((i for i, line in enumerate(lines) if key.match(line)), None)
    if start is None:
        new_lines = lines + ([] if not lines or lines[-1].strip() == "" else ["\n"]) + [block]
    else:
        end = start
        for j in range(start + 1, len(lines)):
            line = lines[j]
            if line.startswith((" ", "\t", "-")):
                end = j
            elif line.strip() and not line.startswith("#"):
                break
        new_lines = lines[:start] + [block] + lines[end + 1:]
    new_text = "".join(new_lines)
    before = yaml.safe_load(text) or {}
    after = yaml.safe_load(new_text) or {}
    others = {k: v for k, v in before.items() if k != section} == {k: v for k, v in after.items() if k != section}
    if after.get(section) != value or not others:
        raise ConfigError([f"{section}: the file's layout could not be edited safely here; edit it by hand"])
    return new_text
