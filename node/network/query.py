"""Query/Retrieve SCU (PS3.4 Annex C, Study Root): C-FIND at study level, then C-MOVE to an AE
title (the source sends the instances there by C-STORE) or C-GET (it sends them back on the same
association, PS3.4 C.4.3, with this side in the SCP role for the storage SOP classes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import AE, build_role, evt

from node.errors import AinodeError, RetrieveError
from node.instances import ReceivedInstance
from node.network.association import Peer, associate
from node.network.scp import TRANSFER_SYNTAXES, read_header
from node.network.status import StoreStatus, status_for

logger = logging.getLogger(__name__)

StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"


@dataclass(frozen=True)
class Transfer:
    """How a C-MOVE or C-GET ended: sub-operations completed, failed and with a warning."""

    completed: int
    failed: int
    warning: int


def find_studies(peer: Peer, calling_ae_title: str, query: Dataset) -> list[Dataset]:
    """C-FIND ``query`` (its Query/Retrieve Level is set to STUDY) and return the matches.

    Raises
    ------
    RetrieveError
        No association, or the peer answered a failure status.
    """
    query.QueryRetrieveLevel = "STUDY"
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, peer)
    found: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.get("Status", 0xC000)) if status is not None else None
            if code is None:
                raise RetrieveError(f"C-FIND to {peer.ae_title}: no response")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found.append(identifier)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise RetrieveError(f"C-FIND to {peer.ae_title} failed with status 0x{code:04X}")
    finally:
        assoc.release()
    return found


def _study_query(study_instance_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_instance_uid
    return ds


def _transfer(responses: object, peer: Peer, operation: str) -> Transfer:
    last: Dataset | None = None
    for status, _identifier in responses:  # type: ignore[attr-defined]
        if status is None:
            raise RetrieveError(f"{operation} from {peer.ae_title}: no response")
        last = status
    if last is None:
        raise RetrieveError(f"{operation} from {peer.ae_title}: no final response")
    code = int(last.get("Status", 0xC000))
    outcome = Transfer(int(last.get("NumberOfCompletedSuboperations", 0)),
                       int(last.get("NumberOfFailedSuboperations", 0)),
                       int(last.get("NumberOfWarningSuboperations", 0)))  # fmt: skip
    if code not in (0x0000, 0xB000):
        raise RetrieveError(f"{operation} from {peer.ae_title} failed with status 0x{code:04X} "
                            f"({outcome.completed} sent, {outcome.failed} failed)")  # fmt: skip
    return outcome


def move_study(peer: Peer, calling_ae_title: str, destination_ae_title: str, study_instance_uid: str) -> Transfer:
    """C-MOVE one study to ``destination_ae_title``.

    Raises
    ------
    RetrieveError
        No association, or the move failed (the peer may not know the destination).
    """
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(ae, peer)
    try:
        responses = assoc.send_c_move(_study_query(study_instance_uid), destination_ae_title,
                                      StudyRootQueryRetrieveInformationModelMove)  # fmt: skip
        return _transfer(responses, peer, "C-MOVE")
    finally:
        assoc.release()


def get_study(
    peer: Peer,
    calling_ae_title: str,
    study_instance_uid: str,
    storage_sop_classes: Sequence[str],
    on_instance: Callable[[ReceivedInstance], None],
) -> Transfer:
    """C-GET one study; each instance the peer sends on the association is handed to
    ``on_instance`` (which stores it durably, else raises: that C-STORE is answered with the
    matching failure status).

    Raises
    ------
    RetrieveError
        No association, or the retrieval failed.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in storage_sop_classes:
        ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
    roles = [build_role(sop_class, scp_role=True) for sop_class in storage_sop_classes]

    def store(event: evt.Event) -> int:
        try:
            encoded = event.encoded_dataset(include_meta=True)
            ds = read_header(encoded)
            instance = ReceivedInstance.from_header(
                ds, encoded, sop_class_uid=str(event.request.AffectedSOPClassUID),
                transfer_syntax_uid=str(event.context.transfer_syntax), calling_ae_title=peer.ae_title,
                association_id=id(event.assoc),
            )  # fmt: skip
            on_instance(instance)
        except AinodeError as exc:
            logger.warning("C-GET instance refused: %s", exc)
            return int(status_for(exc))
        return int(StoreStatus.SUCCESS)

    assoc = associate(ae, peer, [(evt.EVT_C_STORE, store)], roles)
    try:
        responses = assoc.send_c_get(_study_query(study_instance_uid), StudyRootQueryRetrieveInformationModelGet)
        return _transfer(responses, peer, "C-GET")
    finally:
        assoc.release()
