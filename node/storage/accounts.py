"""Console users, their sessions and the log of associations, in the index (shared by a fleet).

Passwords arrive here already hashed (argon2, :mod:`node.console.auth`); a session is stored by
the SHA-256 of its token, so the index never holds a credential that opens the console.
Lock-out: ``max_failures`` consecutive failed logins lock a user for ``lockout_s`` seconds; a
successful login clears the count. An attempt is counted before its password is verified
(:meth:`Accounts.count_login_attempt`), so parallel guesses cannot outrun the lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from node.errors import StorageError
from node.storage.tables import AssociationRow, Role, SessionRow, UserRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Accounts:
    """The console's and the association log's methods of :class:`node.storage.index.Index`."""

    if TYPE_CHECKING:

        def session(self) -> AbstractContextManager[Session]:
            """A transaction (see :meth:`node.storage.index.Index.session`)."""
            ...

    # -- users ---------------------------------------------------------------------------------

    def add_user(self, name: str, role: Role, password_hash: str | None) -> None:
        """Create a user.

        Raises
        ------
        StorageError
            A user of that name exists.
        """
        with self.session() as s:
            taken = s.scalar(select(UserRow.name).where(func.lower(UserRow.name) == name.lower()))
        if taken is not None:
            raise StorageError(f"console user {taken!r} exists (names are compared without case)")
        try:
            with self.session() as s:
                s.add(UserRow(name=name, role=role, password_hash=password_hash, failed_logins=0,
                              created_at=time.time()))  # fmt: skip
        except IntegrityError:
            raise StorageError(f"console user {name!r} exists") from None

    def user(self, name: str) -> UserRow | None:
        """The user ``name``, or ``None``."""
        with self.session() as s:
            return s.get(UserRow, name)

    def users(self) -> list[UserRow]:
        """Every user, by name."""
        with self.session() as s:
            return list(s.scalars(select(UserRow).order_by(UserRow.name)))

    def update_user(self, name: str, **values: object) -> bool:
        """Set columns of a user (``role``, ``password_hash``, ``failed_logins``, ``locked_until``);
        returns whether the user exists. Changing the password or role ends the user's sessions."""
        with self.session() as s:
            found = bool(getattr(s.execute(update(UserRow).where(UserRow.name == name).values(**values)),
                                 "rowcount", 0))  # fmt: skip
            if found and ({"password_hash", "role"} & set(values)):
                s.execute(delete(SessionRow).where(SessionRow.user == name))
            return found

    def remove_user(self, name: str) -> bool:
        """Delete a user and end its sessions; returns whether it existed."""
        with self.session() as s:
            s.execute(delete(SessionRow).where(SessionRow.user == name))
            return bool(getattr(s.execute(delete(UserRow).where(UserRow.name == name)), "rowcount", 0))

    def count_login_attempt(self, name: str, max_failures: int, now: float | None = None) -> str:
        """Count a login attempt of ``name`` as a failure *before* its password is verified, so that
        parallel guesses cannot all pass the lock-out check (one row lock serialises them).

        Returns
        -------
        str
            ``"unknown"`` (no such user), ``"locked"`` (locked, or ``max_failures`` attempts already
            counted and not cleared: do not verify), or ``"counted"`` (verify; then call
            :meth:`login_succeeded` or :meth:`login_failed`).
        """
        now = time.time() if now is None else now
        counted = (
            update(UserRow)
            .where(UserRow.name == name, UserRow.failed_logins < max_failures)
            .where(or_(UserRow.locked_until.is_(None), UserRow.locked_until <= now))
            .values(failed_logins=UserRow.failed_logins + 1)
            .returning(UserRow.name)
        )  # one atomic statement: SQLite has no row locks, and a read-then-write would lose counts
        with self.session() as s:
            if s.execute(counted).first() is not None:
                return "counted"
            return "unknown" if s.get(UserRow, name) is None else "locked"

    def login_failed(self, name: str, max_failures: int, lockout_s: float, now: float | None = None) -> UserRow | None:
        """Settle a counted attempt of ``name`` as failed: once ``max_failures`` are counted in a
        row the user is locked for ``lockout_s`` seconds. Returns the user (``None`` if unknown)."""
        now = time.time() if now is None else now
        with self.session() as s:
            user = s.get(UserRow, name, with_for_update=True)
            if user is None:
                return None
            if user.failed_logins >= max_failures and (user.locked_until is None or user.locked_until <= now):
                user.locked_until, user.failed_logins = now + lockout_s, 0
            return user

    def login_succeeded(self, name: str, now: float | None = None) -> None:
        """Clear the failure count and note the login."""
        now = time.time() if now is None else now
        with self.session() as s:
            s.execute(update(UserRow).where(UserRow.name == name)
                      .values(failed_logins=0, locked_until=None, last_login_at=now))  # fmt: skip

    # -- sessions ------------------------------------------------------------------------------

    def create_session(self, token_digest: str, user: str, csrf_token: str, max_age_s: float) -> None:
        """Record a new session of ``user`` (ending those already expired)."""
        now = time.time()
        with self.session() as s:
            s.execute(delete(SessionRow).where(SessionRow.expires_at < now))
            s.add(SessionRow(token_digest=token_digest, user=user, csrf_token=csrf_token, created_at=now,
                             last_seen_at=now, expires_at=now + max_age_s))  # fmt: skip

    def active_session(self, token_digest: str, idle_s: float) -> tuple[SessionRow, UserRow] | None:
        """The session and its user if the session is neither expired nor idle for ``idle_s``;
        its last use is recorded (at most once every 10 s, to keep requests read-mostly)."""
        now = time.time()
        with self.session() as s:
            row = s.get(SessionRow, token_digest)
            if row is None:
                return None
            if row.expires_at < now or row.last_seen_at < now - idle_s:
                s.delete(row)
                return None
            user = s.get(UserRow, row.user)
            if user is None:
                return None
            if now - row.last_seen_at > 10:
                row.last_seen_at = now
            return row, user

    def end_session(self, token_digest: str) -> None:
        """Forget a session (logout)."""
        with self.session() as s:
            s.execute(delete(SessionRow).where(SessionRow.token_digest == token_digest))

    # -- associations --------------------------------------------------------------------------

    def record_association(
        self,
        calling_ae_title: str,
        outcome: str,
        started_at: float,
        stored: int = 0,
        refused: Mapping[str, int] | None = None,
        bytes_received: int = 0,
    ) -> None:
        """Log one association that ended (``released``, ``aborted``) or was ``rejected``."""
        refused = dict(refused or {})
        with self.session() as s:
            s.add(AssociationRow(
                calling_ae_title=calling_ae_title[:16], outcome=outcome, started_at=started_at, ended_at=time.time(),
                instances_stored=stored, instances_refused=sum(refused.values()),
                refused_statuses=json.dumps(refused, sort_keys=True), bytes_received=bytes_received,
            ))  # fmt: skip

    def prune_associations(self, before: float) -> int:
        """Forget associations that ended before ``before`` (epoch s); returns how many."""
        with self.session() as s:
            return int(getattr(s.execute(delete(AssociationRow).where(AssociationRow.ended_at < before)),
                               "rowcount", 0))  # fmt: skip
