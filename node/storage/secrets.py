"""The node's long-lived secrets, stored encrypted in the object store.

Two random 256-bit secrets are created on first use and kept as sealed objects, so they are
protected by the master key yet survive its rotation (their data keys are re-wrapped like any
object's):

- ``index``: keys the HMAC that turns UIDs into the index's study/series/instance keys;
- ``pseudonym-v1``: keys the pseudonyms of de-identification (the version is the key id recorded
  in every pseudonym map).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from node.storage.store import ObjectStore

PSEUDONYM_SECRET = "pseudonym-v1"


class NodeSecrets:
    """Named secrets of one node, created on first use."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> bytes:
        """The 32-byte secret ``name`` (created and stored durably the first time)."""
        with self._lock:
            if name not in self._cache:
                object_id = f"secret-{name}"
                if self.store.exists(object_id):
                    self._cache[name] = self.store.get(object_id)  # tampered: raises, never replaced
                else:
                    value = secrets.token_bytes(32)
                    self.store.put(value, object_id=object_id)
                    self._cache[name] = value
            return self._cache[name]

    def index_key(self, uid: str) -> str:
        """The index key of a UID: 32 hex digits of HMAC-SHA256 under the ``index`` secret."""
        return hmac.new(self.get("index"), uid.encode(), hashlib.sha256).hexdigest()[:32]

    def lookup_key(self, attribute: str, value: str) -> str | None:
        """The keyed digest under which a study is found by a Patient ID or an Accession Number
        (``attribute`` is the keyword): the same HMAC as :meth:`index_key`, separated by the
        keyword, over the value without padding. ``None`` for an empty value."""
        text = value.strip()
        return self.index_key(f"{attribute}\x00{text}") if text else None
