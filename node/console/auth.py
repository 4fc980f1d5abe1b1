"""Who may use the console, and how they prove it: local users, sessions, CSRF, lock-out, roles.

- **Passwords** are hashed with argon2id (argon2-cffi's defaults, RFC 9106); at least
  :data:`MIN_PASSWORD_LENGTH` characters; there is no default user or password
  (``ainode users add NAME --role admin``). An unknown user name costs the same hash verification
  as a known one, so timing does not tell which names exist.
- **Lock-out**: ``console.max_failed_logins`` failures in a row lock the user for
  ``console.lockout_s`` seconds, with a security alert in the audit trail; every login, logout and
  failure is audited with the user name (at most 64 characters) and address. An attempt is
  counted before its password is verified, so parallel guesses cannot outrun the lock, and the
  answer is the same for an unknown name, a wrong password and a locked account.
- **Throttle** (:class:`LoginThrottle`): at most ``console.max_concurrent_logins`` password
  verifications at once; an address with ``console.max_failures_per_address`` recent failures
  is refused (429) before any hash is computed; names over 64 and passwords over 1024
  characters are refused unverified.
- **Sessions** are random 256-bit tokens in an HttpOnly, SameSite=Strict cookie (Secure when the
  console is reached over HTTPS); the index keeps only their SHA-256, with an idle and an absolute
  expiry (``console.session_idle_s``, ``session_max_s``).
- **CSRF**: every state-changing request carries the session's CSRF token, in a form field
  (``csrf_token``) or the ``X-CSRF-Token`` header (synchronizer token), checked in constant time;
  the login form, before any session, uses a double-submit cookie.
- **Roles** (:data:`PERMISSIONS`): ``viewer`` sees the dashboard, studies, jobs, routing, keys and
  the audit trail without PHI; ``operator`` also retries dead letters, re-runs studies and looks
  studies up (without seeing PHI); ``admin`` also purges, reloads the configuration, rotates keys
  and is the only role that sees PHI (re-identifies), each view audited.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from node.audit import (
    LOGIN,
    LOGOUT,
    USER_AUTHENTICATION,
    AuditEvent,
    AuditLog,
    Participant,
    security_alert,
)
from node.errors import AccessDeniedError, AuthenticationError, ConfigError, RateLimitedError
from node.settings.console import ConsoleSettings
from node.storage.index import Index
from node.storage.tables import Role, UserRow

logger = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
MAX_NAME_LENGTH = 64
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
WRONG_LOGIN = "wrong user name or password, or the account is locked after repeated failures"
VERIFY_WAIT_S = 10.0
MAX_TRACKED_ADDRESSES = 10000
SESSION_COOKIE = "ainode_session"
LOGIN_CSRF_COOKIE = "ainode_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

PERMISSIONS: dict[str, frozenset[Role]] = {
    "view": frozenset(Role),
    "test_rules": frozenset(Role),
    "retry": frozenset({Role.OPERATOR, Role.ADMIN}),
    "rerun": frozenset({Role.OPERATOR, Role.ADMIN}),
    "lookup": frozenset({Role.OPERATOR, Role.ADMIN}),
    "fetch": frozenset({Role.OPERATOR, Role.ADMIN}),
    "purge": frozenset({Role.ADMIN}),
    "reload": frozenset({Role.ADMIN}),
    "rotate_keys": frozenset({Role.ADMIN}),
    "reidentify": frozenset({Role.ADMIN}),
}
"""Action -> the roles allowed to take it. ``reidentify``: see PHI (lookup details, audit
trail with Study Instance UIDs)."""

_hasher = PasswordHasher()


@cache
def _dummy_hash() -> str:
    """A hash to verify against when the user does not exist (same cost as a real one)."""
    return _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string) of ``password``.

    Raises
    ------
    ConfigError
        The password is shorter than :data:`MIN_PASSWORD_LENGTH` characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"password: at least {MIN_PASSWORD_LENGTH} characters, please")
    return _hasher.hash(password)


def password_matches(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``password_hash`` (``None``: an OIDC user, never by password)."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def digest(token: str) -> str:
    """What the index keeps of a session token: its SHA-256 (hex)."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (``None`` never equals anything)."""
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_user_name(name: str) -> str:
    """``name`` if it may name a console user: 1-64 letters, digits and ``. _ @ -``, starting
    with a letter or digit (an OIDC user's e-mail address fits).

    Raises
    ------
    ConfigError
        It does not.
    """
    if USER_NAME.fullmatch(name) is None:
        raise ConfigError("user name: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


class LoginThrottle:
    """What stands before the password hash (argon2id: 64 MiB and ~0.1 s a verification).

    At most ``concurrent`` verifications run at once (others wait up to :data:`VERIFY_WAIT_S`,
    then are refused); an address with ``per_address`` failures within ``window_s`` is refused
    until they age out. Kept in memory: a console process's own defence (the lock-out itself,
    per user, is in the shared index).
    """

    def __init__(self, concurrent: int, per_address: int, window_s: float) -> None:
        self._slots = threading.BoundedSemaphore(concurrent)
        self.per_address, self.window_s = per_address, max(window_s, 60.0)
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.setdefault(address, deque())
        while times and times[0] < now - self.window_s:
            times.popleft()
        return times

    def check_address(self, address: str) -> None:
        """Raise :class:`RateLimitedError` if ``address`` failed too often lately."""
        with self._lock:
            if len(self._recent(address, time.monotonic())) >= self.per_address:
                raise RateLimitedError("too many failed sign-ins from this address; try again later")

    def failed(self, address: str) -> None:
        """Count a failed sign-in from ``address``."""
        with self._lock:
            if len(self._failures) > MAX_TRACKED_ADDRESSES:  # forget the quiet ones first
                now = time.monotonic()
                self._failures = {a: t for a, t in self._failures.items() if self._recent(a, now)}
            self._recent(address, time.monotonic()).append(time.monotonic())

    @contextmanager
    def verifying(self) -> Iterator[None]:
        """Hold one of the verification slots.

        Raises
        ------
        RateLimitedError
            No slot came free within :data:`VERIFY_WAIT_S`.
        """
        if not self._slots.acquire(timeout=VERIFY_WAIT_S):
            raise RateLimitedError("too many sign-ins at once; try again in a moment")
        try:
            yield
        finally:
            self._slots.release()


@dataclass(frozen=True)
class CurrentUser:
    """The signed-in user of a request."""

    name: str
    role: Role
    csrf_token: str
    token_digest: str

    def can(self, action: str) -> bool:
        """Whether the user's role allows ``action`` (a key of :data:`PERMISSIONS`)."""
        return self.role in PERMISSIONS[action]

    def require(self, action: str) -> None:
        """Raise :class:`AccessDeniedError` unless the role allows ``action``."""
        if not self.can(action):
            raise AccessDeniedError(f"{self.role} may not {action.replace('_', ' ')}")


class Authenticator:
    """Logs users in and out and resolves sessions, over the index's users and sessions.

    Parameters
    ----------
    index
        Where users and sessions live (shared by a fleet).
    settings
        A callable returning the console settings in force (lock-out, session lifetimes).
    audit
        The node's audit log: every login, logout, failure and lock-out is recorded.
    """

    def __init__(self, index: Index, settings: ConsoleSettings, audit: AuditLog) -> None:
        self.index, self.settings, self.audit = index, settings, audit
        self.sso_check: Callable[[str], bool] | None = None
        """For a single sign-on user's session (by token digest): whether the provider still grants
        its role (:meth:`node.console.oidc.OidcLogin.still_granted`); ``False`` ends the session."""
        self.throttle = LoginThrottle(settings.max_concurrent_logins, settings.max_failures_per_address,
                                      settings.lockout_s)  # fmt: skip

    def _audit(self, name: str, address: str, event_type: tuple[str, str], outcome: int, text: str) -> None:
        who = [Participant(name[:MAX_NAME_LENGTH], requestor=True, address=address[:64])]
        self.audit.record(AuditEvent(USER_AUTHENTICATION, "E", outcome, event_type, who, description=text))

    def login(self, name: str, password: str, address: str) -> tuple[str, CurrentUser]:
        """Check ``name`` and ``password``; returns the new session's token and user.

        The attempt is refused before any password is verified when the name or password is
        over its cap, the address has failed too often (:class:`LoginThrottle`), or the user is
        locked or has as many attempts under way as it may fail; otherwise it is counted as a
        failure first, then verified (at most ``max_concurrent_logins`` verifications at once).

        Raises
        ------
        AuthenticationError
            Unknown user, wrong password, or locked out: one message for all three, so the
            answer never tells whether a name exists.
        RateLimitedError
            Too many verifications under way, or too many failures from ``address``.
        """
        refused = AuthenticationError(WRONG_LOGIN)
        shown = name[:MAX_NAME_LENGTH] + ("…" if len(name) > MAX_NAME_LENGTH else "")
        if len(name) > MAX_NAME_LENGTH or len(password) > MAX_PASSWORD_LENGTH or not name:
            self._audit(shown, address, LOGIN, 4, "console login refused: user name or password over its length")
            raise refused
        self.throttle.check_address(address)
        state = self.index.count_login_attempt(name, self.settings.max_failed_logins)
        if state == "locked":
            self._audit(name, address, LOGIN, 4, "console login refused: account locked")
            raise refused
        with self.throttle.verifying():
            user = self.index.user(name) if state == "counted" else None
            matches = password_matches(user.password_hash if user else None, password)
        if user is None or not matches:
            self.throttle.failed(address)
            self._audit(name, address, LOGIN, 4, "console login failed: wrong user name or password")
            now = time.time()
            updated = self.index.login_failed(name, self.settings.max_failed_logins, self.settings.lockout_s, now)
            if updated is not None and updated.locked_until is not None and updated.locked_until > now:
                who = [Participant(name, requestor=True, address=address)]
                text = f"console user locked for {self.settings.lockout_s:g} s after repeated failed logins"
                self.audit.record(security_alert(USER_AUTHENTICATION, text, who))
                logger.warning("console user locked out after repeated failures")
            raise refused
        return self.start_session(user, address)

    def start_session(self, user: UserRow, address: str) -> tuple[str, CurrentUser]:
        """A new session for ``user`` (after a password or an OIDC login); audited."""
        self.index.login_succeeded(user.name)
        token, csrf = new_token(), new_token()
        self.index.create_session(digest(token), user.name, csrf, self.settings.session_max_s)
        self._audit(user.name, address, LOGIN, 0, "console login")
        return token, CurrentUser(user.name, Role(user.role), csrf, digest(token))

    def user_of(self, token: str | None) -> CurrentUser:
        """The user of the session ``token``.

        Raises
        ------
        AuthenticationError
            No token, or the session is unknown, expired or idle too long.
        """
        if not token:
            raise AuthenticationError("sign in first")
        found = self.index.active_session(digest(token), self.settings.session_idle_s)
        if found is None:
            raise AuthenticationError("session expired; sign in again", "expired")
        session, user = found
        if user.password_hash is None and self.sso_check is not None and not self.sso_check(session.token_digest):
            self.index.end_session(session.token_digest)
            self._audit(user.name, "", LOGOUT, 4, "console session ended: single sign-on no longer grants the role")
            raise AuthenticationError("your single sign-on account no longer grants this access", "sso-ended")
        return CurrentUser(user.name, Role(user.role), session.csrf_token, session.token_digest)

    def logout(self, user: CurrentUser, address: str) -> None:
        """End the session; audited."""
        self.index.end_session(user.token_digest)
        self._audit(user.name, address, LOGOUT, 0, "console logout")


def check_csrf(user: CurrentUser, presented: str | None) -> None:
    """Raise :class:`AccessDeniedError` unless ``presented`` is the session's CSRF token."""
    if not tokens_equal(user.csrf_token, presented):
        raise AccessDeniedError("missing or invalid CSRF token; reload the page and try again")
