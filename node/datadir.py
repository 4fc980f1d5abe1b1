"""One way to open a node's data directory, for every process: node, receivers, CLI (later workers).

:func:`open_data_dir` builds the encrypted store (with the disk watermark), the index (with the busy
timeout), the node's secrets and the audit log (with its ATNA mirror) from the configuration, and
announces which master key the process seals with, so that administrative commands that change keys
know what every running process uses::

    DATA_DIR/run/keys/<pid>     "<role> <key id>" of each live process ("?" while it loads its keys)

``ainode keys rotate`` (:func:`rotate_keys`) adds a key to the key file; every process of the node
reads the changed file within a fraction of a second (:meth:`DataDir.refresh_keys`, called from
their main loops) and announces the new key once no object sealed with the old one is still being
written. Only then are the data keys re-wrapped, and a key is retired only when no stored object,
no audit record and no live process uses it.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets as random
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.audit import AuditLog
from node.audit.syslog import SyslogSender
from node.errors import KeyProviderError, TamperedObjectError
from node.settings.config import FileKeySource, Settings
from node.storage.index import Index
from node.storage.keys import KeyringProvider, load_key_provider, write_keyring
from node.storage.secrets import NodeSecrets
from node.storage.store import ObjectStore

logger = logging.getLogger(__name__)

LOADING = "?"


class KeyUse:
    """The announcements of which master key each live process of a data directory seals with."""

    def __init__(self, folder: Path, role: str) -> None:
        self.folder = folder
        self.role = role
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._own = folder / str(os.getpid())
        atexit.register(self._own.unlink, missing_ok=True)

    def announce(self, key_id: str) -> None:
        """Record (atomically) that this process now seals with ``key_id`` (or :data:`LOADING`)."""
        tmp = self._own.with_suffix(".new")
        tmp.write_text(f"{self.role} {key_id}\n")
        os.replace(tmp, self._own)

    def live(self) -> dict[int, tuple[str, str]]:
        """``pid -> (role, key id)`` of every live process; announcements of dead ones are removed."""
        out: dict[int, tuple[str, str]] = {}
        for path in self.folder.iterdir():
            if not path.name.isdigit():
                continue
            pid = int(path.name)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
                continue
            except PermissionError:
                pass  # alive, another user's
            try:
                role, _, key_id = path.read_text().strip().partition(" ")
            except OSError:
                continue
            out[pid] = (role, key_id)
        return out


@dataclass
class DataDir:
    """The parts of a node's data directory that every process of the node opens for itself."""

    settings: Settings
    store: ObjectStore
    index: Index
    secrets: NodeSecrets
    audit: AuditLog
    key_use: KeyUse
    mirror: SyslogSender | None = field(default=None)

    @property
    def keyring(self) -> KeyringProvider:
        """The store's master keys."""
        keys = self.store.keys
        assert isinstance(keys, KeyringProvider)
        return keys

    def refresh_keys(self) -> bool:
        """Take a changed key file (``ainode keys rotate``) and announce the key now in use; returns
        whether the keys changed. Cheap (one ``stat``) when nothing changed: main loops call it often."""
        try:
            changed = self.keyring.reload()
        except KeyProviderError as exc:
            logger.error("key file changed but cannot be read; keeping the keys in memory: %s", exc)
            return False
        if changed:
            self.key_use.announce(self.keyring.current().key_id)
            logger.info("master keys reloaded", extra={"key_id": self.keyring.current().key_id})
        return changed

    def close(self) -> None:
        """Release the index's connections."""
        self.index.engine.dispose()


def open_data_dir(settings: Settings, role: str = "cli") -> DataDir:
    """Open (creating if needed, mode 0700) the encrypted store, the index, the node's secrets and
    the audit log under ``node.data_dir``, as configured; ``role`` names the process in the key-use
    announcements (``node``, ``receiver-N``, ``cli``).

    Raises
    ------
    KeyProviderError
        The master key cannot be loaded.
    ConfigError
        The audit mirror's certificates cannot be loaded.
    """
    data_dir = settings.node.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_use = KeyUse(data_dir / "run" / "keys", role)
    key_use.announce(LOADING)  # before the keys are read: a rotation waits for this process
    keys = load_key_provider(settings.keys)
    key_use.announce(keys.current().key_id)
    store = ObjectStore(data_dir / "store", keys, settings.node.min_free_disk_mb * 2**20)
    mirror = SyslogSender(settings.audit.syslog) if settings.audit.syslog is not None else None
    audit = AuditLog.for_data_dir(data_dir, store, settings.node.ae_title, mirror)
    index = Index.for_data_dir(data_dir, settings.storage.database_busy_timeout_s, settings.storage.database_url)
    return DataDir(settings, store, index, NodeSecrets(store), audit, key_use, mirror)


@dataclass
class Rotation:
    """What :func:`rotate_keys` did."""

    current: str
    rewrapped: int = 0
    tampered: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # key id -> why it stays


def rotate_keys(data: DataDir, add_key: bool = True, wait_s: float = 30.0) -> Rotation:
    """Add a new current master key (key file only), wait until every live process seals with it,
    re-wrap every object's and audit record's data key, then retire the keys nothing uses.

    With ``add_key`` false only the last three steps run (``ainode keys retire``). Keys from an
    environment variable cannot be changed here: put the new key first in the variable and restart
    the node's processes, then run this to re-wrap; nothing is retired (the variable is the site's).

    Raises
    ------
    KeyProviderError
        The key file cannot be read or written.
    """
    source = data.settings.keys
    if add_key and isinstance(source, FileKeySource):
        write_keyring(source.path, [random.token_bytes(32), *[k.secret for k in load_key_provider(source).keys]])
    data.refresh_keys()
    current = data.keyring.current().key_id
    lagging = _wait_for(data.key_use, current, wait_s)
    result = Rotation(current)
    for object_id in data.store.object_ids():
        try:
            result.rewrapped += data.store.rewrap(object_id)
        except TamperedObjectError as exc:
            result.tampered.append(str(exc))
    data.audit.rewrap()
    in_use = set(data.store.objects_per_key()) | data.audit.key_ids()
    for key_id in data.keyring.key_ids()[1:]:
        if key_id in in_use:
            result.kept[key_id] = "still wraps stored objects or audit records"
        elif key_id in lagging.values() or (lagging and LOADING in lagging.values()):
            users = ", ".join(f"pid {pid}" for pid, k in lagging.items() if k in (key_id, LOADING))
            result.kept[key_id] = f"still used by {users}; run 'ainode keys retire' later"
        else:
            result.retired.append(key_id)
    if result.retired and isinstance(source, FileKeySource):
        write_keyring(source.path, [k.secret for k in data.keyring.keys if k.key_id not in result.retired])
        data.refresh_keys()
    elif result.retired:
        result.kept.update({k: "comes from the environment: remove it there" for k in result.retired})
        result.retired = []
    return result


def _wait_for(key_use: KeyUse, key_id: str, wait_s: float) -> dict[int, str]:
    """Wait until every live process announces ``key_id``; returns ``pid -> key`` of those that did not."""
    deadline = time.monotonic() + wait_s
    while True:
        lagging = {pid: k for pid, (_role, k) in key_use.live().items() if k != key_id}
        if not lagging or time.monotonic() >= deadline:
            return lagging
        time.sleep(0.1)
