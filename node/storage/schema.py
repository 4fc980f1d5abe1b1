"""Revisions of the index schema, managed by Alembic (``node/storage/migrations``).

A node checks the revision whenever it opens the index: an empty database is created at the newest
revision; one at the newest revision opens; anything else is refused with what to do, so that no
process runs on a schema it does not know. ``ainode db upgrade`` migrates in place, including an
index made before migrations existed (it has the tables but no ``alembic_version``: it is marked
as the baseline revision, whose schema it has, then upgraded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from node.errors import IndexSchemaError

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
"""The revision whose schema the releases before migrations created."""
_TABLES = {"studies", "instances", "jobs"}


@dataclass(frozen=True)
class SchemaState:
    """Where an index database stands.

    Attributes
    ----------
    current
        Its revision; ``None`` for an empty database, ``"legacy"`` for one made before migrations.
    head
        The newest revision this release knows.
    """

    current: str | None
    head: str

    @property
    def known(self) -> bool:
        """Whether this release knows the database's revision (or it is empty or legacy)."""
        if self.current in (None, "legacy"):
            return True
        try:
            return _scripts().get_revision(self.current) is not None
        except CommandError:
            return False


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision of the index schema."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise IndexSchemaError("no index migrations are installed")
    return revision


def state(engine: Engine) -> SchemaState:
    """The revision of the index database behind ``engine``."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and _TABLES & set(inspect(connection).get_table_names()):
            current = "legacy"
    return SchemaState(current, head())


def upgrade(engine: Engine) -> SchemaState:
    """Migrate the index behind ``engine`` to the newest revision; returns where it stood before.

    Raises
    ------
    IndexSchemaError
        The database holds a revision this release does not know (made by a newer release).
    """
    before = state(engine)
    if not before.known:
        raise IndexSchemaError(
            f"index schema revision {before.current!r} is newer than this release knows ({before.head}): "
            "run a release that knows it"
        )
    with engine.begin() as connection:
        config = _config(connection)
        if before.current == "legacy":
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    return before


def check(engine: Engine) -> None:
    """Open-time check: create an empty index at the newest revision, accept one at it, refuse the rest.

    Raises
    ------
    IndexSchemaError
        The index is older (``ainode db upgrade`` migrates it) or newer than this release knows.
    """
    now = state(engine)
    if now.current == now.head:
        return
    if now.current is None:
        try:
            upgrade(engine)
        except SQLAlchemyError:  # another process of this node created it at the same moment
            if state(engine).current != now.head:
                raise
        return
    if not now.known:
        raise IndexSchemaError(
            f"index schema revision {now.current!r} is newer than this release knows ({now.head}); "
            "run the release that wrote it"
        )
    shown = "from before migrations" if now.current == "legacy" else f"at revision {now.current}"
    raise IndexSchemaError(f"index schema {shown}, this release needs {now.head}: run `ainode db upgrade`")
