"""Deliver result objects to a route's destinations, and withdraw the results a re-analysis replaced.

Each destination type of the configuration has one class here (:data:`DESTINATION_TYPES`), with
the same two operations: :meth:`Destination.send` and :meth:`Destination.withdraw`. A new type (a
DICOMweb archive, say) is one class and one entry.

- :class:`DicomPeer` sends by C-STORE (PS3.4 Annex B) over DICOM TLS when the peer asks for it,
  and withdraws with an IHE IOCM Rejection Note (a KOS referencing what it replaces).
- :class:`DicomwebArchive` sends by STOW-RS (PS3.18) with the configured HTTP authentication, and
  withdraws with the same rejection note, by STOW-RS.
- :class:`Folder` writes PS3.10 files ``root/<StudyInstanceUID>/<Modality>_<SOPInstanceUID>.dcm``
  atomically, every path checked to stay under its root (:func:`node.paths.path_under`), and
  withdraws by deleting the superseded files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.uid import generate_uid

from node.dicomio import encode
from node.errors import DeliveryError
from node.network.association import Peer
from node.network.commitment import Commitment, request_commitment
from node.network.dicomweb import http_session, stow
from node.network.scu import send_datasets
from node.network.tls import client_context
from node.paths import path_under
from node.settings.config import DicomDestination, DicomwebDestination, FolderDestination, Settings
from node.storage.index import Index
from node.uids import check_uid

logger = logging.getLogger(__name__)


class Destination(Protocol):
    """What the deliver stage needs of a destination."""

    def send(self, objects: Sequence[Dataset]) -> None:
        """Deliver ``objects``; raises :class:`~node.errors.DeliveryError` naming what failed."""
        ...

    def withdraw(self, superseded: Sequence[Dataset], note: Dataset) -> bool:
        """Withdraw ``superseded`` (``note``: their IOCM Rejection Note); whether anything was done."""
        ...


class _SendsRejectionNotes:
    """Withdraws superseded results by sending their IOCM Rejection Note like any result object
    (C-STORE or STOW-RS), unless the destination says ``reject_superseded: false``."""

    config: Any  # DicomDestination or DicomwebDestination: both have reject_superseded

    def send(self, objects: Sequence[Dataset]) -> None:
        raise NotImplementedError

    def withdraw(self, superseded: Sequence[Dataset], note: Dataset) -> bool:
        if not self.config.reject_superseded:
            return False
        self.send([note])
        return True


class DicomPeer(_SendsRejectionNotes):
    """A DICOM peer (``type: dicom``), reached by C-STORE; with ``commitment``, a delivery is done
    only once the peer's storage commitment report confirms every object (PS3.4 Annex J)."""

    def __init__(self, settings: Settings, config: DicomDestination, index: Index | None = None) -> None:
        self.settings, self.config, self.index = settings, config, index

    def send(self, objects: Sequence[Dataset]) -> None:
        peer = self.settings.peer(self.config.peer)  # as configured now: addresses may change
        tls = None
        if peer.tls:
            if self.settings.node.tls is None:
                raise DeliveryError(f"peer {peer.ae_title} needs TLS but node.tls is not configured")
            tls = client_context(self.settings.node.tls)
        outcome = send_datasets(objects, peer.host, peer.port, calling_ae_title=self.settings.node.ae_title,
                                called_ae_title=peer.ae_title, tls=tls)  # fmt: skip
        if outcome.failed:
            statuses = sorted({f"0x{s:04X}" if s is not None else "none" for s in outcome.statuses.values()})
            raise DeliveryError(f"{len(outcome.failed)} object(s) not accepted (status {', '.join(statuses)})")
        if self.config.commitment:
            self._commit(objects, Peer(peer.ae_title, peer.host, peer.port, tls))

    def _commit(self, objects: Sequence[Dataset], peer: Peer) -> None:
        """Ask ``peer`` to commit ``objects`` and wait for its report (it arrives at this node's
        Storage SCP, in whichever receiving process, and is recorded in the index)."""
        if self.index is None:
            raise DeliveryError("storage commitment needs the index (not available here)")
        transaction = generate_uid()
        self.index.add_commitment(transaction, peer.ae_title, len(objects))
        references = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in objects]
        request_commitment(peer, self.settings.node.ae_title, Commitment(transaction, references))
        deadline = time.monotonic() + self.config.commitment_timeout_s
        while time.monotonic() < deadline:
            row = self.index.commitment(transaction)
            if row is not None and row.reported_at is not None:
                failures = json.loads(row.failures or "[]")
                if failures or (row.committed or 0) < row.requested:
                    reasons = ", ".join(sorted(set(failures))) or "none given"
                    raise DeliveryError(f"{peer.ae_title} committed {row.committed} of {row.requested} object(s) "
                                        f"(failure reason {reasons})")  # fmt: skip
                logger.info("storage commitment confirmed", extra={"peer": peer.ae_title, "objects": row.committed})
                return
            time.sleep(0.2)
        raise DeliveryError(f"no storage commitment report from {peer.ae_title} within "
                            f"{self.config.commitment_timeout_s:g} s")  # fmt: skip


class DicomwebArchive(_SendsRejectionNotes):
    """A DICOMweb service (``type: dicomweb``), reached by STOW-RS. A partial failure (PS3.18
    Failed SOP Sequence) is sent again once, only what failed; what still fails is the error,
    each object's failure reason named."""

    def __init__(self, settings: Settings, config: DicomwebDestination, index: Index | None = None) -> None:
        self.config = config

    def send(self, objects: Sequence[Dataset]) -> None:
        session = http_session(self.config.auth, self.config.ca_certificates)
        pending = list(objects)
        for attempt in (1, 2):
            outcome = stow(self.config.url, session, pending, self.config.timeout_s)
            if not outcome.failed:
                return
            pending = [ds for ds in pending if str(ds.SOPInstanceUID) in outcome.failed]
            reasons = sorted(set(outcome.failed.values()))
            logger.warning("STOW-RS stored %d, %d failed (%s), attempt %d", len(outcome.stored),
                           len(outcome.failed), ", ".join(reasons), attempt)  # fmt: skip
            if not pending:  # the service named objects we did not send
                break
        kinds = ", ".join(f"{ds.Modality}" for ds in pending)
        raise DeliveryError(f"STOW-RS: {len(outcome.failed)} object(s) not stored ({kinds}): failure reason "
                            f"{', '.join(sorted(set(outcome.failed.values())))}")  # fmt: skip


class Folder:
    """A folder the node owns (``type: folder``)."""

    def __init__(self, settings: Settings, config: FolderDestination, index: Index | None = None) -> None:
        self.root = config.path

    def send(self, objects: Sequence[Dataset]) -> None:
        write_folder(self.root, objects)

    def withdraw(self, superseded: Sequence[Dataset], note: Dataset) -> bool:
        for ds in superseded:
            _folder_path(self.root, ds).unlink(missing_ok=True)
        return True


DESTINATION_TYPES: dict[type, Callable[[Settings, Any, Index | None], Destination]] = {
    DicomDestination: DicomPeer,
    FolderDestination: Folder,
    DicomwebDestination: DicomwebArchive,
}
"""Configuration model of a destination type -> the class that delivers to it."""


def destination(settings: Settings, name: str, index: Index | None = None) -> Destination:
    """The configured destination ``name``, ready to deliver (``index``: where storage
    commitment reports are found)."""
    config = settings.destinations[name]
    return DESTINATION_TYPES[type(config)](settings, config, index)


def write_folder(root: Path, objects: Sequence[Dataset]) -> list[Path]:
    """Write each object to ``root/<StudyInstanceUID>/<Modality>_<SOPInstanceUID>.dcm`` atomically.

    A re-delivered object (same deterministic SOP Instance UID) replaces its earlier file.

    Raises
    ------
    InvalidInstanceError
        A path would not stay under ``root`` (see :func:`_folder_path`).
    """
    written = []
    for ds in objects:
        final = _folder_path(root, ds)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_suffix(".tmp")
        data = encode(ds)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        written.append(final)
    return written


def _folder_path(root: Path, ds: Dataset) -> Path:
    """Where a result object lives in a folder destination, checked to stay under ``root``.

    Raises
    ------
    InvalidInstanceError
        The object's Study Instance or SOP Instance UID (received, or derived from received ones)
        is not a valid UID, or its Modality is not a plain name: nothing is written or deleted.
    """
    study = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    sop = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    return path_under(root, study, f"{ds.Modality}_{sop}.dcm")


def withdraw(
    settings: Settings,
    destination_names: Sequence[str],
    superseded: Sequence[Dataset],
    note: Dataset,
    index: Index | None = None,
) -> list[str]:
    """Withdraw results that a re-analysis replaced, at every named destination (see the module
    docstring); returns the destinations they were withdrawn from.

    Raises
    ------
    DeliveryError
        A peer refused the note or could not be reached.
    """
    return [name for name in destination_names if destination(settings, name, index).withdraw(superseded, note)]


def deliver(
    settings: Settings, destination_names: Sequence[str], objects: Sequence[Dataset], index: Index | None = None
) -> None:
    """Send every named destination the ``objects`` of the kinds it receives (its ``objects`` and
    ``sr`` settings); a destination that receives none of them is skipped with a log line.

    Raises
    ------
    DeliveryError
        A destination refused an object or could not be reached (the message names which).
    """
    from node.results import result_kind  # highdicom's package: loaded with the results

    errors = []
    for name in destination_names:
        kinds = settings.destinations[name].result_kinds()
        chosen = [ds for ds in objects if result_kind(ds) in kinds]
        if not chosen:
            logger.info("destination %s receives none of the result objects built (%s)", name, sorted(kinds))
            continue
        try:
            destination(settings, name, index).send(chosen)
        except (DeliveryError, OSError) as exc:
            errors.append(f"{name}: {exc}")
            logger.warning("delivery to %s failed: %s", name, exc)
    if errors:
        raise DeliveryError("; ".join(errors))
