"""A Storage SCU: sends SOP instances to a peer by C-STORE (PS3.4 Annex B, PS3.7 9.1.1).

Presentation contexts are proposed for exactly what is sent: one context per (SOP class, transfer
syntax) of a compressed instance (the SCP accepts one transfer syntax per context, PS3.8 9.3.2.2,
and nothing here transcodes compressed pixels), and one per SOP class offering Explicit and Implicit
VR Little Endian for uncompressed instances. An instance for which the peer accepted no context is
reported with the reason and the others still go. Sockets use TCP_NODELAY. A response that never
arrives (pynetdicom#875: the SCU may miss a response and wait out the DIMSE timeout) counts as a
failure, and the instances still unanswered are resent once on a new association.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from node.errors import DeliveryError
from node.network.association import set_tcp_nodelay

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 limits an association to 128 presentation contexts


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE status per SOP Instance UID (``None``: no response was received, or the instance
    could not be sent; ``reasons`` then says why)."""

    statuses: dict[str, int | None]
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """SOP Instance UIDs without a Success or Warning (0xB000-0xBFFF) status."""
        return [uid for uid, s in self.statuses.items() if s is None or not (s == 0 or 0xB000 <= s <= 0xBFFF)]


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    return str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None


def _contexts(datasets: Sequence[Dataset]) -> list:
    """One context per (SOP class, compressed transfer syntax); one per SOP class with both
    uncompressed little-endian syntaxes for the uncompressed instances (pynetdicom converts those)."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for ds in datasets:
        ts = _transfer_syntax(ds)
        if ts is None or ts in (*UNCOMPRESSED, ExplicitVRBigEndian) or not UID(ts).is_compressed:
            syntaxes: tuple[str, ...] = tuple(sorted({*UNCOMPRESSED, *([ts] if ts else [])}))
        else:
            syntaxes = (ts,)
        wanted[(str(ds.SOPClassUID), syntaxes)] = None
    if len(wanted) > MAX_CONTEXTS:
        raise DeliveryError(
            f"{len(wanted)} (SOP class, transfer syntax) pairs in one send; at most {MAX_CONTEXTS} per association"
        )
    return [build_context(sop, list(ts)) for sop, ts in wanted]


def _send_once(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    calling: str,
    called: str,
    timeout_s: float,
    tls: ssl.SSLContext | None,
    reasons: dict[str, str],
) -> dict[str, int | None]:
    ae = AE(ae_title=calling)
    ae.requested_contexts = _contexts(datasets)
    ae.acse_timeout = ae.network_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    assoc = ae.associate(
        host,
        port,
        ae_title=called,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        tls_args=(tls, host) if tls is not None else None,
    )
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DeliveryError(f"association with {called} at {host}:{port} {reason}")
    statuses: dict[str, int | None] = {}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                statuses[uid] = None
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this SOP class and syntax
                statuses[uid] = None
                reasons[uid] = str(exc).splitlines()[0]
                continue
            statuses[uid] = int(response.Status) if response is not None and "Status" in response else None
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def send_datasets(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    called_ae_title: str,
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> StoreOutcome:
    """Send ``datasets`` on one association (retrying unanswered ones once on a new association),
    over DICOM TLS when ``tls`` is given.

    Raises
    ------
    DeliveryError
        The association could not be established.
    """
    reasons: dict[str, str] = {}
    statuses = _send_once(datasets, host, port, calling_ae_title, called_ae_title, timeout_s, tls, reasons)
    missing = [ds for ds in datasets if statuses.get(uid := str(ds.SOPInstanceUID)) is None and uid not in reasons]
    if missing:
        logger.warning("resending %d instance(s) that got no C-STORE response", len(missing))
        statuses.update(_send_once(missing, host, port, calling_ae_title, called_ae_title, timeout_s, tls, reasons))
    for uid, status in statuses.items():
        if status is None:
            reasons.setdefault(uid, "no C-STORE response")
        elif not (status == 0 or 0xB000 <= status <= 0xBFFF):
            reasons.setdefault(uid, f"refused with status 0x{status:04X}")
    return StoreOutcome(statuses, reasons)
