"""The Storage SCP: accepts associations from known peers and stores what they send.

Implements the Storage Service Class SCP (PS3.4 Annex B) and the Verification SCP (PS3.4 Annex A).
The C-STORE handler is deliberately thin: check the header, hand the encoded bytes (as a PS3.10
file, without decoding pixels) to the injected ``on_store`` callback, which stores them encrypted
and durably and indexes them, then answer. Everything else happens later in jobs.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from pydicom import Dataset, dcmread, uid
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.transport import AssociationServer

from node.errors import AinodeError, ConfigError, InvalidInstanceError
from node.instances import STORAGE_SOP_CLASSES, ReceivedInstance
from node.network.association import set_tcp_nodelay
from node.network.commitment import STORAGE_COMMITMENT, Commitment, read_report, read_request
from node.network.dataset import DataSetBuffer, SpoolLike
from node.network.status import StoreStatus, status_for
from node.network.tls import subject_of
from node.network.transport import GuardedAssociationServer, Handover

logger = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless,
)  # fmt: skip
"""Transfer syntaxes accepted for storage: uncompressed, deflated and the lossless/lossy codecs
the pylibjpeg plugins decode."""


@dataclass
class AssociationSummary:
    """What one association carried, for the association log (no UID, name or address).

    ``refused`` counts the instances answered with a failure status, by the status's name.
    """

    association_id: int
    calling_ae_title: str
    address: str
    started_at: float = field(default_factory=time.time)
    stored: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    outcome: str = "released"


StoreCallback = Callable[[ReceivedInstance], None]
SecurityCallback = Callable[[str, str, str], None]
"""Told (calling AE title, source address, reason) about every refused association or TLS handshake."""
ReleaseCallback = Callable[[AssociationSummary], None]
"""Told what an association carried when it ends (released or aborted)."""
RefusalCallback = Callable[[str, str, str, str], None]
"""Told (calling AE title, source address, status name, reason) about every instance refused
because of what it holds (not for 0xA700, which asks the sender to try again later)."""


_HEADER_TAGS = [
    Tag("SOPClassUID"), Tag("SOPInstanceUID"), Tag("StudyInstanceUID"), Tag("SeriesInstanceUID"),
    Tag("PatientID"), Tag("AccessionNumber"),
]  # fmt: skip


def read_header(encoded: bytes) -> Dataset:
    """The four UIDs the SCP checks (and the Patient ID and Accession Number the lookup keys are
    made of), parsed from the PS3.10 bytes without touching pixel data."""
    try:
        return dcmread(io.BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInstanceError(f"data set cannot be parsed: {type(exc).__name__}") from None


CommitmentCallback = Callable[[str, str, "Commitment"], None]
"""Told (calling AE title, source address, the transaction) of a storage commitment request or report."""


@dataclass(frozen=True)
class PeerRule:
    """Who may associate as ``ae_title``: from which networks and with which certificate subject."""

    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    certificate_subject: str | None = None

    def refusal(self, address: str, subject: str | None) -> str | None:
        """Why this peer is refused from ``address`` with ``subject``, or ``None`` if admitted."""
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"{self.ae_title} from an unparsable address"
            if not any(ip in net for net in self.networks):
                return f"{self.ae_title} called from {address}, not from its configured addresses"
        if self.certificate_subject is not None and subject != self.certificate_subject:
            return f"{self.ae_title} presented certificate subject {subject!r}, not the configured one"
        return None


class _AccessControlledAE(AE):
    """An AE whose list of admitted calling AE titles depends on the association asking.

    pynetdicom reads ``require_calling_aet`` while negotiating, in the association's own thread;
    peers whose address or certificate does not match are left out, so the requestor gets the
    standard A-ASSOCIATE-RJ "calling AE title not recognised" (PS3.8 9.3.4).
    """

    def __init__(
        self,
        ae_title: str,
        rules: Sequence[PeerRule],
        handover: Handover,
        max_per_address: int = 12,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(ae_title=ae_title)
        self.rules = {r.ae_title: r for r in rules}
        self.refusals: dict[int, str] = {}
        self.handover = handover
        self.max_per_address = max_per_address
        self.on_refused = on_refused
        self.on_tls_failure: Callable[[str, str], None] | None = None
        self.new_buffer: Callable[[], DataSetBuffer] | None = None

    def make_server(  # type: ignore[override]
        self,
        address: Any,
        ae_title: str | None = None,
        contexts: Any = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: Any = None,
        server_class: type[AssociationServer] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A :class:`~node.network.transport.GuardedAssociationServer` (PDU deadlines and limits,
        TLS handshake off the accept loop, connections per address capped; connections handed
        between receiver processes as ``handover`` says)."""
        return super().make_server(
            address, ae_title=ae_title, contexts=contexts, ssl_context=ssl_context, evt_handlers=evt_handlers,
            server_class=GuardedAssociationServer, network_timeout_s=self.network_timeout,
            max_per_address=self.max_per_address, handover=self.handover, on_tls_failure=self.on_tls_failure,
            on_refused=self.on_refused, new_buffer=self.new_buffer, **kwargs,
        )  # fmt: skip

    @property
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association):
            return list(self.rules)
        address = str(assoc.requestor.address)
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        subject = subject_of(sock.getpeercert()) if isinstance(sock, ssl.SSLSocket) else None
        admitted = []
        for title, rule in self.rules.items():
            reason = rule.refusal(address, subject)
            if reason is None:
                admitted.append(title)
            elif title == str(assoc.requestor.ae_title).strip():
                self.refusals[id(assoc)] = reason
        return admitted or ["\\"]  # an empty list would admit everyone; no AE title contains a backslash

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise TypeError("admitted peers come from the PeerRule list given to the AE")


def _with_prefix(prefix: bytes, buffer: DataSetBuffer) -> Iterator[bytes]:
    """A spooled data set as a PS3.10 file, part by part."""
    yield prefix
    yield from buffer.parts()


class StorageSCP:
    """A pynetdicom Storage SCP bound to one address.

    Parameters
    ----------
    ae_title
        Our AE title; associations calling another title are rejected (A-ASSOCIATE-RJ,
        reason "called AE title not recognised", PS3.8 9.3.4).
    peers
        The peers allowed to associate, each optionally bound to source networks and a client
        certificate subject; others are rejected with reason "calling AE title not recognised".
    on_store
        Called for each C-STORE with the received instance; it must store it durably before it
        returns. An :class:`~node.errors.AinodeError` it raises becomes the matching DIMSE status.
    on_refused_instance
        Told about every instance refused for what it holds (0xA900, 0xC000), with the reason,
        for the audit trail.
    handover
        How this Storage SCP shares its port with other receiver processes (default: it does not).
    max_per_address
        Connections admitted at once from one source address (see :mod:`node.network.transport`).
    network_timeout_s
        Deadline for each PDU, the TLS handshake and an idle connection's A-ASSOCIATE-RQ.
    max_dataset_bytes, spool
        Data sets over ``max_dataset_bytes`` are not kept and refused (0xC000); beyond
        :data:`~node.network.dataset.MEMORY_BYTES` a data set goes to ``spool()``
        (:mod:`node.network.dataset`).
    """

    def __init__(
        self,
        ae_title: str,
        peers: Sequence[PeerRule],
        on_store: StoreCallback,
        *,
        on_security_event: SecurityCallback | None = None,
        on_release: ReleaseCallback | None = None,
        on_refused_instance: RefusalCallback | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_associations: int = 16,
        handover: Handover | None = None,
        max_per_address: int = 12,
        max_pdu_bytes: int = 262144,
        network_timeout_s: float = 60.0,
        dimse_timeout_s: float = 60.0,
        sop_classes: Sequence[str] = tuple(STORAGE_SOP_CLASSES.values()),
        max_dataset_bytes: int = 2 * 2**30,
        spool: Callable[[], SpoolLike] | None = None,
        on_commitment: CommitmentCallback | None = None,
        on_commitment_report: CommitmentCallback | None = None,
    ) -> None:
        self.on_store = on_store
        self.on_security_event = on_security_event
        self.on_release = on_release
        self.on_refused_instance = on_refused_instance
        self.ssl_context = ssl_context
        if not peers:
            raise ConfigError("peers: at least one peer must be configured to receive from")
        # pynetdicom's chunked receive would spool each data set to a plaintext temporary file
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False
        ae = _AccessControlledAE(ae_title, peers, handover or Handover(), max_per_address, self._connection_refused)
        ae.new_buffer = lambda: DataSetBuffer(max_dataset_bytes, spool)
        ae.require_called_aet = True
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu_bytes
        ae.network_timeout = network_timeout_s
        ae.acse_timeout = network_timeout_s  # an idle connection that never asks is closed as well
        ae.dimse_timeout = dimse_timeout_s
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self.on_commitment, self.on_commitment_report = on_commitment, on_commitment_report
        if on_commitment is not None or on_commitment_report is not None:
            # a peer asks us to commit (we are the SCP), or reports on what we asked (it is the SCP)
            ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        self.ae = ae
        self._server: object | None = None
        self._associations: dict[int, AssociationSummary] = {}
        self._associations_lock = threading.Lock()

    def _summary(self, assoc: Association) -> AssociationSummary:
        """The running summary of ``assoc`` (created on first use)."""
        with self._associations_lock:
            summary = self._associations.get(id(assoc))
            if summary is None:
                summary = self._associations[id(assoc)] = AssociationSummary(
                    id(assoc), str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)
                )
            return summary

    def _handle_established(self, event: Event) -> None:
        self._summary(event.assoc)

    def _handle_store(self, event: Event) -> int:
        status = self._store(event)
        summary = self._summary(event.assoc)
        if status == StoreStatus.SUCCESS:
            summary.stored += 1
        else:
            summary.refused[StoreStatus(status).name] += 1
        return status

    def _store(self, event: Event) -> StoreStatus:
        calling = event.assoc.requestor.ae_title.strip()
        summary = self._summary(event.assoc)
        try:
            request = cast(C_STORE, event.request)
            buffer = request.DataSet
            size, parts = -1, None
            if isinstance(buffer, DataSetBuffer):
                summary.bytes_received += buffer.received
                buffer.check()  # too large, or the spool failed: refused with its status
            if isinstance(buffer, DataSetBuffer) and buffer.spooled:
                prefix = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))
                encoded = prefix + buffer.getvalue()  # the beginning: the header is in it
                size = len(prefix) + buffer.received
                parts = partial(_with_prefix, prefix, buffer)

            else:
                encoded = event.encoded_dataset(include_meta=True)
                if not isinstance(buffer, DataSetBuffer):
                    summary.bytes_received += len(encoded)
            ds = read_header(encoded)
            sop_class_uid = str(request.AffectedSOPClassUID)
            instance = ReceivedInstance.from_header(
                ds, encoded, sop_class_uid=sop_class_uid, transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae_title=calling, association_id=id(event.assoc), size=size, parts=parts,
            )  # fmt: skip
            if instance.sop_instance_uid != str(request.AffectedSOPInstanceUID):
                raise InvalidInstanceError("SOP Instance UID differs from the C-STORE request's")
            if str(getattr(ds, "SOPClassUID", "")) != sop_class_uid:
                reason = "SOP Class UID of the data set does not match the C-STORE request's"
                logger.warning("C-STORE refused: %s", reason, extra={"calling_ae": calling})
                self._refused(event, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, reason)
                return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
            self.on_store(instance)
        except AinodeError as exc:
            status = status_for(exc)
            logger.warning("C-STORE refused (%s): %s", status.name, exc, extra={"calling_ae": calling})
            self._refused(event, status, str(exc))
            return status
        except Exception:  # a defect must not take the association (or the node) down
            logger.exception("C-STORE failed", extra={"calling_ae": calling})
            return StoreStatus.PROCESSING_FAILURE
        finally:
            buffer = getattr(event.request, "DataSet", None)
            if isinstance(buffer, DataSetBuffer):
                buffer.discard()  # the spool's file goes now, not when the request is collected
        return StoreStatus.SUCCESS

    def _handle_commitment(self, event: Event) -> tuple[int, None]:
        """N-ACTION-RQ: a peer asks the node to commit instances (the report follows later)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            if self.on_commitment is None or event.action_type != 1:
                return 0x0123, None  # No such action
            self.on_commitment(calling, str(event.assoc.requestor.address), read_request(event.action_information))
        except AinodeError as exc:
            logger.warning("storage commitment request refused: %s", exc, extra={"calling_ae": calling})
            return 0x0110, None
        return 0x0000, None

    def _handle_commitment_report(self, event: Event) -> tuple[int, None]:
        """N-EVENT-REPORT-RQ: a peer reports on a commitment the node asked for."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            if self.on_commitment_report is None:
                return 0x0110, None
            report = read_report(event.event_information)
            if event.event_type == 1:
                report.failed.clear()
            self.on_commitment_report(calling, str(event.assoc.requestor.address), report)
        except AinodeError as exc:
            logger.warning("storage commitment report refused: %s", exc, extra={"calling_ae": calling})
            return 0x0110, None
        return 0x0000, None

    def _refused(self, event: Event, status: StoreStatus, reason: str) -> None:
        """Tell ``on_refused_instance`` (the audit trail) why an instance was refused."""
        if self.on_refused_instance is not None and status != StoreStatus.OUT_OF_RESOURCES:
            requestor = event.assoc.requestor
            self.on_refused_instance(str(requestor.ae_title).strip(), str(requestor.address), status.name, reason)

    def set_peers(self, peers: Sequence[PeerRule]) -> None:
        """Replace the admitted peers (configuration reload); running associations are unaffected."""
        if not peers:
            raise ConfigError("peers: at least one peer must be configured to receive from")
        self.ae.rules = {r.ae_title: r for r in peers}

    def _handle_rejected(self, event: Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        called = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        reason = self.ae.refusals.pop(id(assoc), None)
        if reason is None:
            if calling not in self.ae.rules:
                reason = f"unknown calling AE title {calling!r}"
            elif called != self.ae.ae_title.strip():
                reason = f"called AE title {called!r} is not ours"
            else:
                reason = "association limit reached"
        logger.warning("association rejected: %s", reason, extra={"address": assoc.requestor.address})
        if self.on_security_event is not None:
            self.on_security_event(calling, str(assoc.requestor.address), reason)

    def _handle_end(self, event: Event, outcome: str) -> None:
        summary = self._summary(event.assoc)
        with self._associations_lock:
            self._associations.pop(summary.association_id, None)
        summary.outcome = outcome
        if self.on_release is not None:
            self.on_release(summary)

    def _connection_refused(self, address: str, reason: str) -> None:
        if self.on_security_event is not None:
            self.on_security_event("", address, reason)

    def _tls_failure(self, address: str, reason: str) -> None:
        logger.warning("TLS handshake failed: %s", reason, extra={"address": address})
        if self.on_security_event is not None:
            self.on_security_event("", address, f"TLS handshake failed: {reason}")

    def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` in background threads (DICOM TLS only, when a context is set)."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, lambda _event: 0x0000),
            (evt.EVT_N_ACTION, self._handle_commitment),
            (evt.EVT_N_EVENT_REPORT, self._handle_commitment_report),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ESTABLISHED, self._handle_established),
            (evt.EVT_RELEASED, lambda event: self._handle_end(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._handle_end(event, "aborted")),
        ]
        self.ae.on_tls_failure = self._tls_failure
        self._server = self.ae.start_server(
            (host, port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        logger.info("Storage SCP listening", extra={"port": port, "ae_title": self.ae.ae_title})

    def stop(self) -> None:
        """Stop accepting associations and close the listening socket."""
        self.ae.shutdown()
