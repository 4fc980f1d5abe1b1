"""Each study's pseudonym map in the store: merged by every series and generation that is
de-identified (one map per study, replaced only if unchanged meanwhile), read back to re-identify
results. :class:`StudyMaps` keeps the original Study Instance UID of the studies this process
worked on in memory, so a job's later stages do not decrypt the whole map again to learn it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from node.deid.reid import PseudonymMap
from node.errors import DeidentificationError, StorageError
from node.storage.index import Index
from node.storage.store import ObjectStore

REMEMBERED = 4096
"""Studies whose original Study Instance UID a process keeps in memory."""


class StudyMaps:
    """The stored pseudonym maps of studies (see the module docstring)."""

    def __init__(self, store: ObjectStore, index: Index) -> None:
        self.store, self.index = store, index
        self._original: OrderedDict[str, str] = OrderedDict()  # the most recent studies
        self._lock = threading.Lock()

    def _remember(self, study_key: str, uid: str) -> None:
        with self._lock:
            self._original[study_key] = uid
            self._original.move_to_end(study_key)
            while len(self._original) > REMEMBERED:
                self._original.popitem(last=False)

    def merge(self, study_key: str, mapping: PseudonymMap) -> None:
        """Store the study's pseudonym map with ``mapping`` merged in: one map per study covering
        every series and generation analysed (pseudonyms are deterministic, so they agree). A
        concurrent job's merge is not lost: the map is replaced only if unchanged meanwhile.

        Raises
        ------
        StorageError
            The merged map could not be recorded after repeated concurrent updates.
        """
        self._remember(study_key, mapping.original_study_instance_uid)
        for _attempt in range(10):
            study = self.index.study(study_key)
            previous = study.map_object_id if study is not None else None
            merged = PseudonymMap.from_bytes(self.store.get(previous)) if previous else mapping
            if previous:
                merged.add(mapping.uids)
            map_id = self.store.put(merged.to_bytes())
            if self.index.set_map_object(study_key, map_id, expect=previous):
                if previous:
                    self.store.delete(previous)
                return
            self.store.delete(map_id)  # another job merged first: merge into its map
        raise StorageError("pseudonym map: could not record the merged map after concurrent updates")

    def stored(self, study_key: str) -> PseudonymMap:
        """The study's stored pseudonym map: what re-identification uses.

        Raises
        ------
        DeidentificationError
            The study has no stored map (nothing of it was de-identified).
        """
        study = self.index.study(study_key)
        if study is None or not study.map_object_id:
            raise DeidentificationError("the study has no stored pseudonym map")
        mapping = PseudonymMap.from_bytes(self.store.get(study.map_object_id))
        self._remember(study_key, mapping.original_study_instance_uid)
        return mapping

    def original_study_uid(self, study_key: str) -> str:
        """The study's original Study Instance UID (from memory when this process de-identified
        or re-identified it, else from its stored map).

        Raises
        ------
        DeidentificationError
            The study has no stored map.
        """
        with self._lock:
            known = self._original.get(study_key)
        return known if known is not None else self.stored(study_key).original_study_instance_uid

    def forget(self, study_key: str) -> None:
        """Drop what is kept in memory of a study (its job ended)."""
        with self._lock:
            self._original.pop(study_key, None)
