"""A Storage SCU: sends SOP instances to a peer by C-STORE (PS3.4 Annex B, PS3.7 9.1.1).

Presentation contexts are proposed for exactly the SOP classes being sent, each with the
instance's own transfer syntax plus Explicit and Implicit VR Little Endian. Sockets use
TCP_NODELAY. A response that never arrives (pynetdicom#875: the SCU may miss a response and wait
out the DIMSE timeout) counts as a failure, and the instances still unanswered are resent once on
a new association.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from node.errors import DeliveryError
from node.network.scp import set_tcp_nodelay

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 limits an association to 128 presentation contexts


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE status per SOP Instance UID (``None``: no response was received)."""

    statuses: dict[str, int | None]

    @property
    def failed(self) -> list[str]:
        """SOP Instance UIDs without a Success or Warning (0xB000-0xBFFF) status."""
        return [uid for uid, s in self.statuses.items() if s is None or not (s == 0 or 0xB000 <= s <= 0xBFFF)]


def _contexts(datasets: Sequence[Dataset]) -> list:
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
        syntaxes = wanted.setdefault(str(ds.SOPClassUID), {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        if ts:
            syntaxes.add(ts)
    if len(wanted) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(wanted)} SOP classes in one send; at most {MAX_CONTEXTS} per association")
    return [build_context(sop, sorted(ts)) for sop, ts in wanted.items()]


def _send_once(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    calling: str,
    called: str,
    timeout_s: float,
    tls: ssl.SSLContext | None,
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
            response = assoc.send_c_store(ds)
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
    statuses = _send_once(datasets, host, port, calling_ae_title, called_ae_title, timeout_s, tls)
    missing = [ds for ds in datasets if statuses.get(str(ds.SOPInstanceUID)) is None]
    if missing:
        logger.warning("resending %d instance(s) that got no C-STORE response", len(missing))
        statuses.update(_send_once(missing, host, port, calling_ae_title, called_ae_title, timeout_s, tls))
    return StoreOutcome(statuses)
