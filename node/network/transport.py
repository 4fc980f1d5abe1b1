"""pynetdicom's association server, hardened against peers that never finish what they start.

pynetdicom 3.0.4 reads each PDU with blocking ``recv`` calls and no deadline, buffers a PDU of any
declared length before looking at it, and does the TLS handshake inside its accept loop. An
unauthenticated peer could therefore hold a thread forever with three bytes of a PDU header, grow
the process by gigabytes with one 6-byte header, or stop every TLS association with one idle TCP
connection. This module is the only place that knows about it:

- every PDU must arrive whole within ``network_timeout_s`` (PS3.8 9.1.5: the DUL may abort an
  association whose peer stops); a partial PDU times out and the connection is closed;
- a PDU longer than we accept is refused from its 6-byte header, before anything is buffered: an
  A-ASSOCIATE-RQ (and any other PDU before the association is established) may be at most
  :data:`MAX_ASSOCIATE_RQ_BYTES`, a P-DATA-TF at most the Maximum Length we announced (PS3.8 D.1);
- the TLS handshake runs in the connection's own thread with the same timeout, off the accept loop;
- connections from one source address are capped (``max_per_address``) below the association limit,
  so that one misbehaving host cannot take every association slot.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

MAX_ASSOCIATE_RQ_BYTES = 64 * 1024
"""Largest A-ASSOCIATE-RQ accepted: 128 presentation contexts with every transfer syntax and a user
identity fit in a few tens of kB."""

_PDU_TYPES = range(0x01, 0x08)
_P_DATA_TF = 0x04
_SLACK = 1024  # lenient senders round up; no legitimate PDU is larger than announced by more
_UNLIMITED_PDU_BYTES = 64 * 2**20  # Maximum Length 0 means "no limit" (PS3.8 D.1): still cap it

TLSFailureCallback = Callable[[str, str], None]
"""Told (source address, reason) about every failed TLS handshake."""
RefusalCallback = Callable[[str, str], None]
"""Told (source address, reason) about every connection refused before association negotiation."""


class PduGuard:
    """Reads PDUs for one association with a deadline and a length limit.

    Installed as the ``recv`` of pynetdicom's :class:`AssociationSocket`, whose DUL reads each PDU as
    a 6-byte header (type, reserved, length) and then the body.
    """

    def __init__(self, association_socket: AssociationSocket, timeout_s: float, max_pdu_bytes: int) -> None:
        self.association_socket = association_socket
        self.timeout_s = timeout_s
        self.max_pdu_bytes = max_pdu_bytes or _UNLIMITED_PDU_BYTES
        self._body_expected = False

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == _P_DATA_TF and self.association_socket.assoc.is_established:
            return self.max_pdu_bytes + _SLACK
        return MAX_ASSOCIATE_RQ_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer when the peer closes), all within the network timeout.

        Raises
        ------
        TimeoutError
            The peer stopped sending in the middle of a PDU.
        OSError
            The PDU header declares more bytes than we accept; nothing of the body is read.
        """
        sock = self.association_socket.socket
        if sock is None:
            return bytearray()
        header = not self._body_expected
        self._body_expected = False
        deadline = time.monotonic() + self.timeout_s
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"partial PDU: {len(data)} of {nr_bytes} bytes within {self.timeout_s:g} s; closing"
                    )
                sock.settimeout(remaining)
                chunk = sock.recv(min(65536, nr_bytes - len(data)))
                if not chunk:
                    return data
                data.extend(chunk)
        finally:
            sock.settimeout(self.timeout_s)
        if header and nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type in _PDU_TYPES:
                if length > self._limit(pdu_type):
                    raise OSError(f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit; refused")
                self._body_expected = True
        return data


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the PDU guard on the association's socket."""

    server: GuardedAssociationServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None:
            guard = PduGuard(sock, self.server.network_timeout_s, self.server.ae.maximum_pdu_size)
            sock.recv = guard.recv  # type: ignore[method-assign]  # the DUL's reads go through the guard
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """A threaded association server with the protections listed in the module docstring.

    Parameters
    ----------
    network_timeout_s
        Deadline for a whole PDU and for the TLS handshake.
    max_per_address
        Connections admitted at once from one source address (more are closed at once).
    reuse_port
        Listen with ``SO_REUSEPORT`` so that several receiver processes share the port.
    on_tls_failure, on_refused
        Told about failed handshakes and refused connections (for the audit trail).
    """

    daemon_threads = True  # a connection's thread lives as long as its association ...
    block_on_close = False  # ... and pynetdicom aborts those after closing the server

    def __init__(
        self,
        *args: Any,
        network_timeout_s: float = 60.0,
        max_per_address: int = 12,
        reuse_port: bool = False,
        on_tls_failure: TLSFailureCallback | None = None,
        on_refused: RefusalCallback | None = None,
        **kwargs: Any,
    ) -> None:
        self.network_timeout_s = network_timeout_s
        self.max_per_address = max_per_address
        self.reuse_port = reuse_port
        self.on_tls_failure = on_tls_failure
        self.on_refused = on_refused
        self._connections: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        kwargs.setdefault("request_handler", _GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind (with ``SO_REUSEPORT`` when asked)."""
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; the TLS handshake is left to the connection's thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.network_timeout_s)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection unless its source address already holds ``max_per_address``."""
        address = str(client_address[0])
        with self._count_lock:
            if self._connections[address] >= self.max_per_address:
                refused = True
            else:
                self._connections[address] += 1
                refused = False
        if refused:
            reason = f"{self.max_per_address} connections from this address already; connection closed"
            logger.warning("connection refused: %s", reason, extra={"address": address})
            if self.on_refused is not None:
                self.on_refused(address, reason)
        return not refused

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: TLS handshake (with a deadline), then the association."""
        address = str(client_address[0])
        try:
            if self.ssl_context is not None:
                request = self._handshake(request, address)
                if request is None:
                    return
            self.finish_request(request, client_address)
            assoc = _association_of(request)
            if assoc is not None:
                assoc.join()  # the connection counts against its address until the association ends
        except Exception:  # the connection's boundary: pynetdicom's own handling, then close
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        finally:
            with self._count_lock:
                self._connections[address] -= 1
                if self._connections[address] <= 0:
                    del self._connections[address]

    def _handshake(self, request: socket.socket, address: str) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            tls.settimeout(self.network_timeout_s)
            tls.do_handshake()
            return tls
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            if self.on_tls_failure is not None:
                self.on_tls_failure(address, str(reason))
            self.shutdown_request(request)
            return None


def _association_of(request: Any) -> Any:
    """The acceptor association running on ``request`` (found among the live acceptor threads)."""
    for thread in threading.enumerate():
        if "AcceptorThread" in thread.name:
            sock = getattr(getattr(getattr(thread, "dul", None), "socket", None), "socket", None)
            if sock is request:
                return thread
    return None
