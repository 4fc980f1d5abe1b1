"""What the node receives: a SOP instance as the Storage SCP hands it to the storage layer
(:class:`ReceivedInstance`), and the storage SOP classes it accepts. A bottom-layer module: the
network edge makes these, the store's ingest and start-up reconciliation take them, neither
importing the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom import Dataset

from node.uids import check_instance_uids

STORAGE_SOP_CLASSES: dict[str, str] = {
    "CT Image Storage": "1.2.840.10008.5.1.4.1.1.2",
    "Enhanced CT Image Storage": "1.2.840.10008.5.1.4.1.1.2.1",
    "Legacy Converted Enhanced CT Image Storage": "1.2.840.10008.5.1.4.1.1.2.2",
    "MR Image Storage": "1.2.840.10008.5.1.4.1.1.4",
    "Enhanced MR Image Storage": "1.2.840.10008.5.1.4.1.1.4.1",
    "Legacy Converted Enhanced MR Image Storage": "1.2.840.10008.5.1.4.1.1.4.4",
    "Secondary Capture Image Storage": "1.2.840.10008.5.1.4.1.1.7",
}
"""SOP classes the SCP accepts. A short list keeps association negotiation fast (the acceptor's cost
grows with the number of supported presentation contexts)."""


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE request as handed to the storage layer.

    ``encoded`` is the PS3.10 file (preamble, file meta, data set) exactly as received, in the
    negotiated transfer syntax; pixel data are not decoded. ``patient_id`` and
    ``accession_number`` (PHI, in memory only) become keyed digests for the console's lookup.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    encoded: bytes
    association_id: int = 0
    patient_id: str = ""
    accession_number: str = ""
    size: int = -1
    """The PS3.10 file's size in bytes (``-1``: ``len(encoded)``)."""
    parts: Callable[[], Iterable[bytes]] | None = None
    """A large data set: its whole PS3.10 file, part by part (``encoded`` then holds only its
    beginning, enough for the header)."""

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.encoded))

    @classmethod
    def from_header(
        cls, ds: Dataset, encoded: bytes, *, sop_class_uid: str, transfer_syntax_uid: str,
        calling_ae_title: str = "", association_id: int = 0, size: int = -1,
        parts: Callable[[], Iterable[bytes]] | None = None,
    ) -> ReceivedInstance:  # fmt: skip
        """The instance whose PS3.10 bytes are ``encoded`` and whose parsed header is ``ds``.

        Raises
        ------
        InvalidInstanceError
            Its SOP Instance, Study Instance or Series Instance UID is missing or not a valid UID.
        """
        study_instance_uid, series_instance_uid, sop_instance_uid = check_instance_uids(ds)
        return cls(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae_title=calling_ae_title,
            encoded=encoded,
            association_id=association_id,
            patient_id=str(ds.get("PatientID", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or ""),
            size=size,
            parts=parts,
        )
