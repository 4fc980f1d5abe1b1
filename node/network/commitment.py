"""Storage Commitment Push Model (PS3.4 Annex J) over pynetdicom.

As SCP: a peer's N-ACTION-RQ (Action Type 1, "Request Storage Commitment") names a Transaction UID
and the instances it sent; it is answered at once, and the result comes later as N-EVENT-REPORT
(Event Type 1: every instance committed; 2: some failed, each with its Failure Reason) on a new
association from this node to the peer (the asynchronous mode PACS and IHE RAD-10 expect).

As SCU: :func:`request_commitment` sends the N-ACTION-RQ; the peer's N-EVENT-REPORT arrives on an
association it opens to this node's Storage SCP (:func:`read_report`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydicom import Dataset
from pynetdicom import AE, build_role

from node.errors import DeliveryError, InvalidInstanceError, RetrieveError
from node.network.association import Peer, associate
from node.uids import check_uid

logger = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class."""
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance."""
NO_SUCH_OBJECT_INSTANCE = 0x0112
"""Failure Reason: the instance is not (durably) held."""
MAX_REFERENCES = 100_000


@dataclass
class Commitment:
    """A storage commitment transaction: its UID and the (SOP Class, SOP Instance) pairs it
    concerns; for a report, which were committed and which failed with what reason."""

    transaction_uid: str
    references: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)


def _references(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    out = []
    for item in ds.get(keyword, []):
        out.append((check_uid(str(item.get("ReferencedSOPClassUID", "")), "ReferencedSOPClassUID"),
                    check_uid(str(item.get("ReferencedSOPInstanceUID", "")), "ReferencedSOPInstanceUID")))  # fmt: skip
        if len(out) > MAX_REFERENCES:
            raise InvalidInstanceError(f"storage commitment over {MAX_REFERENCES} instances")
    return out


def read_request(action_information: Dataset | None) -> Commitment:
    """The transaction an N-ACTION-RQ's Action Information asks about.

    Raises
    ------
    InvalidInstanceError
        No Transaction UID, or a malformed reference.
    """
    if action_information is None or "TransactionUID" not in action_information:
        raise InvalidInstanceError("storage commitment request without a Transaction UID")
    uid = check_uid(str(action_information.TransactionUID), "TransactionUID")
    return Commitment(uid, _references(action_information, "ReferencedSOPSequence"))


def read_report(event_information: Dataset | None) -> Commitment:
    """What a peer's N-EVENT-REPORT says of a transaction: ``references`` committed, ``failed``
    with reasons.

    Raises
    ------
    InvalidInstanceError
        No Transaction UID, or a malformed reference.
    """
    if event_information is None:
        raise InvalidInstanceError("storage commitment report without Event Information")
    commitment = read_request(event_information)
    for item in event_information.get("FailedSOPSequence", []):
        commitment.failed.append((str(item.get("ReferencedSOPClassUID", "")),
                                  str(item.get("ReferencedSOPInstanceUID", "")),
                                  int(item.get("FailureReason", 0x0110))))  # fmt: skip
    return commitment


def _sequence(pairs: list[tuple[str, str]], reasons: dict[str, int] | None = None) -> list[Dataset]:
    items = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        if reasons is not None:
            item.FailureReason = reasons[sop_instance]
        items.append(item)
    return items


def send_report(peer: Peer, calling_ae_title: str, commitment: Commitment, committed: set[str]) -> int:
    """Send the N-EVENT-REPORT of ``commitment`` to ``peer`` on a new association (this node
    in the SCP role of the Storage Commitment SOP Class); returns the event type sent.

    Raises
    ------
    DeliveryError
        The peer could not be reached or refused the report.
    """
    ok = [(c, i) for c, i in commitment.references if i in committed]
    failed = [(c, i) for c, i in commitment.references if i not in committed]
    info = Dataset()
    info.TransactionUID = commitment.transaction_uid
    if ok:
        info.ReferencedSOPSequence = _sequence(ok)
    if failed:
        info.FailedSOPSequence = _sequence(failed, {i: NO_SUCH_OBJECT_INSTANCE for _c, i in failed})
    event_type = 2 if failed else 1
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT)
    try:
        assoc = associate(ae, peer, roles=[build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)])
    except RetrieveError as exc:  # a report is a delivery
        raise DeliveryError(f"storage commitment report to {peer.ae_title}: {exc}") from None
    try:
        status, _reply = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        code = int(status.get("Status", 0xC000)) if status is not None else None
    finally:
        assoc.release()
    if code != 0x0000:
        raise DeliveryError(f"storage commitment report to {peer.ae_title} answered {code}")
    return event_type


def request_commitment(peer: Peer, calling_ae_title: str, commitment: Commitment) -> None:
    """Send the N-ACTION-RQ of ``commitment`` to ``peer`` (its report comes later, to the SCP).

    Raises
    ------
    DeliveryError
        The peer could not be reached or refused the request.
    """
    info = Dataset()
    info.TransactionUID = commitment.transaction_uid
    info.ReferencedSOPSequence = _sequence(commitment.references)
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT)
    try:
        assoc = associate(ae, peer)
    except RetrieveError as exc:
        raise DeliveryError(f"storage commitment request to {peer.ae_title}: {exc}") from None
    try:
        status, _reply = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        code = int(status.get("Status", 0xC000)) if status is not None else None
    except ValueError:  # no accepted presentation context: the peer does not do storage commitment
        raise DeliveryError(f"{peer.ae_title} does not accept storage commitment (Push Model SOP Class)") from None
    finally:
        assoc.release()
    if code != 0x0000:
        raise DeliveryError(f"storage commitment request to {peer.ae_title} answered {code}")
