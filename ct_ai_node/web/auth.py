"""Who is asking: users with a password (argon2), API tokens (SHA-256 of a random token),
or, with neither configured, anyone on this machine (the app is then bound to loopback).

Pure logic: no HTTP objects here; the app passes headers and session contents in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ct_ai_node.config import WebSection

_hasher = PasswordHasher()
#: a password hash to verify against when the user does not exist, so that a wrong user
#: name takes as long as a wrong password (no user enumeration by timing)
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
TOKEN_PREFIX = "ctai_"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "admin" or "viewer"
    via: str  # "session", "token" or "open"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPEN_PRINCIPAL = Principal("local", "admin", "open")


def hash_password(password: str) -> str:
    """An argon2id hash for ``web.users[].password_hash``."""
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    return _hasher.hash(password)


def new_token() -> tuple[str, str]:
    """(token to give the script, ``sha256:...`` for ``web.api_tokens[].token_hash``)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def check_password(web: WebSection, name: str, password: str) -> Principal | None:
    """The user ``name`` when ``password`` is theirs, else None (same work either way)."""
    user = next((u for u in web.users if u.name == name), None)
    stored = user.password_hash.get_secret_value() if user is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    return Principal(user.name, user.role, "session") if user is not None else None


def check_bearer(web: WebSection, authorization: str | None) -> Principal | None:
    """The API token's principal for an ``Authorization: Bearer <token>`` header; None
    without such a header or for an unknown token."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    supplied = token_hash(authorization[7:].strip())
    for entry in web.api_tokens:
        if hmac.compare_digest(entry.token_hash.get_secret_value(), supplied):
            return Principal(entry.name, entry.role, "token")
    return None


def check_basic(web: WebSection, authorization: str | None) -> Principal | None:
    """The user of an ``Authorization: Basic`` header when the password is theirs (for
    STOW-RS senders that cannot do sessions); None otherwise."""
    import base64
    import binascii

    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        name, _, password = base64.b64decode(authorization[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return check_password(web, name, password)


def session_user(web: WebSection, name: str | None) -> Principal | None:
    """The logged-in user named in a session, while they are still configured (a user
    removed from the configuration loses their sessions with it)."""
    user = next((u for u in web.users if u.name == name), None) if name else None
    return Principal(user.name, user.role, "session") if user is not None else None


def csrf_matches(expected: str | None, supplied: str | None) -> bool:
    return bool(expected) and bool(supplied) and hmac.compare_digest(str(expected), str(supplied))


def session_secret(web: WebSection, storage_root: Path) -> str:
    """``web.session_secret``, or a random key kept (mode 0600) in ``storage_root/web.key``
    so that log-ins survive a restart of the node."""
    if web.session_secret is not None:
        return web.session_secret.get_secret_value()
    path = Path(storage_root) / "web.key"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key
