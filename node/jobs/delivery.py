"""Deliver result objects to a route's destinations: DICOM peers (C-STORE) or folders (PS3.10 files)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from node.dicomio import encode
from node.errors import DeliveryError
from node.network.scu import send_datasets
from node.network.tls import client_context
from node.paths import path_under
from node.settings.config import DicomDestination, FolderDestination, Settings
from node.uids import check_uid

logger = logging.getLogger(__name__)


def write_folder(root: Path, objects: Sequence[Dataset]) -> list[Path]:
    """Write each object to ``root/<StudyInstanceUID>/<Modality>_<SOPInstanceUID>.dcm`` atomically.

    A re-delivered object (same deterministic SOP Instance UID) replaces its earlier file.
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
    settings: Settings, destination_names: Sequence[str], superseded: Sequence[Dataset], note: Dataset
) -> list[str]:
    """Withdraw results that a re-analysis replaced, at every named destination.

    DICOM peers with ``reject_superseded`` receive ``note`` (the IOCM Rejection Note, a KOS
    referencing ``superseded``) by C-STORE; folders, which the node owns, lose the superseded files.

    Returns
    -------
    list of str
        The destinations the superseded results were withdrawn from.

    Raises
    ------
    DeliveryError
        A peer refused the note or could not be reached.
    """
    done = []
    for name in destination_names:
        dest = settings.destinations[name]
        if isinstance(dest, FolderDestination):
            for ds in superseded:
                _folder_path(dest.path, ds).unlink(missing_ok=True)
            done.append(name)
        elif isinstance(dest, DicomDestination) and dest.reject_superseded:
            _send(settings, dest, [note])
            done.append(name)
    return done


def deliver(settings: Settings, destination_names: Sequence[str], objects: Sequence[Dataset]) -> None:
    """Send every named destination the ``objects`` of the kinds it receives (its ``objects`` and
    ``sr`` settings); a destination that receives none of them is skipped with a log line.

    Raises
    ------
    DeliveryError
        A destination refused an object or could not be reached (the message names which).
    """
    errors = []
    for name in destination_names:
        dest = settings.destinations[name]
        kinds = dest.result_kinds()
        from node.results import result_kind  # highdicom's package: loaded with the results

        chosen = [ds for ds in objects if result_kind(ds) in kinds]
        if not chosen:
            logger.info("destination %s receives none of the result objects built (%s)", name, sorted(kinds))
            continue
        try:
            _send(settings, dest, chosen)
        except (DeliveryError, OSError) as exc:
            errors.append(f"{name}: {exc}")
            logger.warning("delivery to %s failed: %s", name, exc)
    if errors:
        raise DeliveryError("; ".join(errors))


def _send(settings: Settings, dest: DicomDestination | FolderDestination, objects: Sequence[Dataset]) -> None:
    if isinstance(dest, FolderDestination):
        write_folder(dest.path, objects)
        return
    peer = settings.peer(dest.peer)
    tls = None
    if peer.tls:
        if settings.node.tls is None:
            raise DeliveryError(f"peer {peer.ae_title} needs TLS but node.tls is not configured")
        tls = client_context(settings.node.tls)
    outcome = send_datasets(
        objects, peer.host, peer.port, calling_ae_title=settings.node.ae_title, called_ae_title=peer.ae_title, tls=tls
    )
    if outcome.failed:
        statuses = sorted({f"0x{s:04X}" if s is not None else "none" for s in outcome.statuses.values()})
        raise DeliveryError(f"{len(outcome.failed)} object(s) not accepted (status {', '.join(statuses)})")
