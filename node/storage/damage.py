"""Received instances whose stored record is missing or damaged after they were acknowledged
(media or file-system faults, an operator's mistake): found, reported, quarantined and audited.

Every index row of a received instance names a record (:mod:`node.storage.segments`: the object
id is the record's place). :func:`damaged_instances` checks each row against the segments without
decrypting anything — one sequential scan of record heads per segment: a record that is not
whole at its place (the file cut or shortened, bytes removed before it), deleted, or whose
segment is gone is damaged. :func:`set_aside` copies what is left of such a record, still
encrypted, to ``quarantine/``, removes the row (so its study is analysed without it) and audits
it, naming the object and its study key (never a UID). Run at start-up by reconciliation, by
``ainode store verify --repair``, and by a job that meets an unreadable instance.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.errors import StorageError
from node.storage import segments
from node.storage.index import Index
from node.storage.store import ObjectStore
from node.storage.tables import InstanceRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Damage:
    """One received instance whose record is missing or damaged."""

    object_id: str
    study_key: str
    reason: str

    def __str__(self) -> str:
        return f"instance {self.object_id} of study {self.study_key}: {self.reason}"


def damaged_instances(index: Index, store: ObjectStore) -> list[Damage]:
    """Every indexed instance whose record is not whole at its place (see the module docstring)."""
    by_segment: dict[Path, list[InstanceRow]] = defaultdict(list)
    found: list[Damage] = []
    for row in index.all_instances():
        if segments.is_segment_id(row.object_id):
            by_segment[segments.locate(store.segments_root, row.object_id).path].append(row)
        elif not store.exists(row.object_id):
            found.append(Damage(row.object_id, row.study_key, "its object file is missing"))
    for path, rows in by_segment.items():
        if not path.exists():
            found += [Damage(r.object_id, r.study_key, f"segment {path.name} is missing") for r in rows]
            continue
        whole = {offset: not (a.empty and b.empty) for offset, _n, (a, b) in segments.records(path)}
        for row in rows:
            offset = segments.locate(store.segments_root, row.object_id).offset
            if offset not in whole:
                found.append(Damage(row.object_id, row.study_key, f"no whole record at {offset} of {path.name}"))
            elif not whole[offset]:
                found.append(Damage(row.object_id, row.study_key, "its record was deleted"))
    return found


def set_aside(index: Index, store: ObjectStore, damage: Damage, audit: Callable[[str], None]) -> None:
    """Quarantine what is left of a damaged instance's record, forget its index row, log and
    ``audit`` it (one line naming the object and its study key)."""
    try:
        if store.exists(damage.object_id):
            store.quarantine(damage.object_id)
    except StorageError as exc:  # nothing readable is left to keep
        logger.warning("damaged instance %s: nothing to quarantine (%s)", damage.object_id, exc)
    index.remove_instance(damage.object_id)
    text = f"damaged stored instance set aside: {damage}"
    logger.error(text)
    audit(text)
