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

Several receiver processes share one port by hand-over, not by ``SO_REUSEPORT`` (whose hash of the
peers' addresses often puts three of four concurrent associations on one process): the main
process accepts every connection and, through a :class:`ConnectionDispatcher`, passes its descriptor
(``SCM_RIGHTS`` over a Unix socket pair) to the receiver with the fewest open connections, itself
included; a child receiver's server takes connections from that socket pair (its *inbox*) instead of
a listening socket.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.network import acceptance
from node.network.dataset import BufferedDimse, DataSetBuffer

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
HANDOVER_TIMEOUT_S = 2.0
"""Longest wait to pass a connection to a child receiver; after it the main process serves it."""


class SharedCount(Protocol):
    """A counter shared between processes (``multiprocessing.Value``)."""

    value: int


class SharedTime(Protocol):
    """A time shared between processes (``multiprocessing.Value('d')``): a child receiver's last
    heartbeat, in ``time.monotonic()`` seconds (one clock for every process of the host)."""

    value: float


def connection_line() -> tuple[socket.socket, socket.socket]:
    """A Unix ``SOCK_SEQPACKET`` socket pair for handing connections over: (main's end, child's end).
    Each message is one connection: its descriptor and the peer's address."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class ConnectionDispatcher:
    """In the main process: hands each accepted connection to the least busy receiver.

    A receiver's load is its open connections: the main process's own as its server counts them,
    a child's as connections handed to it less those it reported ended (a :class:`SharedCount`
    the child increments). Ties go round-robin, so that one-connection associations alternate.
    A child whose line fails (it died; the node restarts it and attaches the new line) is skipped.
    """

    def __init__(self, stale_s: float = 3.0) -> None:
        self._lines: dict[int, tuple[socket.socket, SharedCount]] = {}
        self._heartbeats: dict[int, SharedTime] = {}
        self._handed: Counter[int] = Counter()
        self._turn = 0
        self._lock = threading.Lock()
        self.stale_s = stale_s
        self._passed_over: set[int] = set()

    def attach(self, number: int, line: socket.socket, ended: SharedCount, heartbeat: SharedTime) -> None:
        """Hand connections to child receiver ``number`` over ``line`` (the main's end of
        :func:`connection_line`); ``ended`` counts the connections the child has finished, and
        ``heartbeat`` is when it last showed it makes progress: a child silent for ``stale_s``
        (stopped, hung, still starting) gets no connection."""
        line.settimeout(HANDOVER_TIMEOUT_S)
        with self._lock:
            old = self._lines.pop(number, None)
            self._lines[number] = (line, ended)
            self._heartbeats[number] = heartbeat
            self._handed[number] = ended.value
            self._passed_over.discard(number)
        if old is not None:
            old[0].close()

    def _responsive(self, number: int) -> bool:
        silent = time.monotonic() - self._heartbeats[number].value
        if silent <= self.stale_s:
            self._passed_over.discard(number)
            return True
        if number not in self._passed_over and self._heartbeats[number].value > 0:
            self._passed_over.add(number)
            logger.error("receiver %d has shown no progress for %.1f s: no connection is handed to it", number, silent)
        return False

    def close(self) -> None:
        """Close every line (the children's servers then see their inbox closed)."""
        with self._lock:
            lines, self._lines = self._lines, {}
        for line, _ended in lines.values():
            line.close()

    def hand_over(self, request: socket.socket, client_address: Any, open_here: int) -> bool:
        """Pass ``request`` to the least busy child receiver; ``False`` when the main process
        (``open_here`` connections besides this one) is the least busy, or the handover failed."""
        with self._lock:
            loads = [(open_here, 0)] + [
                (self._handed[n] - e.value, n) for n, (_line, e) in self._lines.items() if self._responsive(n)
            ]
            least = min(load for load, _number in loads)
            candidates = [number for load, number in loads if load == least]
            self._turn += 1
            chosen = candidates[self._turn % len(candidates)]
            if chosen == 0:
                return False
            line = self._lines[chosen][0]
            address = json.dumps([str(client_address[0]), int(client_address[1])]).encode()
            try:
                socket.send_fds(line, [address], [request.fileno()])
            except OSError as exc:  # the child died or hangs: serve it here
                logger.warning("connection not handed to receiver %d (%s); served here", chosen, exc)
                del self._lines[chosen]
                line.close()
                return False
            self._handed[chosen] += 1
            return True


@dataclass(frozen=True)
class Handover:
    """How a receiver process shares the node's port (see the module docstring).

    Attributes
    ----------
    dispatcher
        The main process: accept, and hand connections to the least busy receiver.
    inbox, ended
        A child receiver: take connections from ``inbox`` (its end of
        :func:`connection_line`), count each finished one in ``ended``.
    """

    dispatcher: ConnectionDispatcher | None = None
    inbox: socket.socket | None = None
    ended: SharedCount | None = None


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
        self._any_pdu = False

    def _closed_before_request(self) -> None:
        """The peer closed the connection without sending an A-ASSOCIATE-RQ (a port probe, a
        health check): pynetdicom's acceptor would wait ``acse_timeout`` for the request and hold
        an association slot meanwhile; tell it that none is coming (it then closes at once)."""
        assoc = self.association_socket.assoc
        if assoc is not None and not assoc.is_established:
            # receive_pdu answers None when its queue is empty; a None put there reads the same
            inbox = cast("queue.Queue[object]", assoc.dul.to_user_queue)
            inbox.put(None)

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
        data = bytearray(nr_bytes)  # read in place: no chunk copies (a P-DATA-TF may be megabytes)
        view = memoryview(data)
        got = 0
        try:
            while got < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"partial PDU: {got} of {nr_bytes} bytes within {self.timeout_s:g} s; closing")
                sock.settimeout(remaining)
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:
                    del view
                    if header and got == 0 and not self._any_pdu:
                        self._closed_before_request()
                    return data[:got]
                got += n
        finally:
            sock.settimeout(self.timeout_s)
        del view
        if header and nr_bytes == 6 and len(data) == 6:
            self._any_pdu = True
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type in _PDU_TYPES:
                if length > self._limit(pdu_type):
                    raise OSError(f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit; refused")
                self._body_expected = True
        return data


class _SharedUidContext(PresentationContext):
    """A presentation context the server supports, whose deep copy shares its UIDs.

    pynetdicom deep-copies every supported context for each association it accepts; a
    :class:`pydicom.uid.UID` is rebuilt by ``deepcopy`` one by one, 0.64 ms per association for
    ainode's 8 SOP classes with 13 transfer syntaxes each (``BENCHMARKS.md``, issue 26). UIDs
    are strings, never changed in place: the copy has its own context object and lists, and
    the same UIDs.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> _SharedUidContext:
        shared = cls.__new__(cls)
        shared.__dict__.update(vars(context))
        return shared

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        return acceptance.copy_context(self)


class _GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the PDU guard on the association's socket."""

    server: GuardedAssociationServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        if self.server.new_buffer is not None:  # bounded memory per incoming data set
            assoc.dimse = BufferedDimse(assoc, self.server.new_buffer)
        if acceptance.installed():  # an A-ASSOCIATE-RQ seen before is not decoded again
            assoc.dul._decode_pdu = acceptance.remembering_decoder(assoc.dul)  # type: ignore[method-assign,assignment]
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
    handover
        How this process shares the port with other receiver processes (:class:`Handover`).
    on_tls_failure, on_refused
        Told about failed handshakes and refused connections (for the audit trail).
    new_buffer
        Makes the buffer of each incoming data set (:class:`~node.network.dataset.DataSetBuffer`);
        none: pynetdicom's own (in memory, unbounded).
    """

    daemon_threads = True  # a connection's thread lives as long as its association ...
    block_on_close = False  # ... and pynetdicom aborts those after closing the server

    def __init__(
        self,
        *args: Any,
        network_timeout_s: float = 60.0,
        max_per_address: int = 12,
        handover: Handover | None = None,
        on_tls_failure: TLSFailureCallback | None = None,
        on_refused: RefusalCallback | None = None,
        new_buffer: Callable[[], DataSetBuffer] | None = None,
        **kwargs: Any,
    ) -> None:
        self.network_timeout_s = network_timeout_s
        self.new_buffer = new_buffer
        self.max_per_address = max_per_address
        handover = handover or Handover()
        self.dispatcher, self.inbox, self.ended = handover.dispatcher, handover.inbox, handover.ended
        self.on_tls_failure = on_tls_failure
        self.on_refused = on_refused
        self._connections: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        kwargs.setdefault("request_handler", _GuardedRequestHandler)
        super().__init__(*args, **kwargs)
        self.contexts = [_SharedUidContext.of(c) for c in self.contexts]

    def server_bind(self) -> None:
        """Bind, or (a child receiver) take connections from the inbox instead."""
        if self.inbox is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self.inbox

    def server_activate(self) -> None:
        """Listen (not a child receiver: its inbox is already connected)."""
        if self.inbox is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, or take the next one from the inbox; the TLS handshake is left to
        the connection's thread."""
        assert self.socket is not None
        if self.inbox is None:
            client, address = self.socket.accept()
        else:
            message, fds, _flags, _address = socket.recv_fds(self.inbox, 1024, 1)
            if not fds:  # the main process closed the line (it stops, or died: we follow it)
                time.sleep(0.5)
                raise OSError("connection line closed by the main process")
            client = socket.socket(fileno=fds[0])
            host, port = json.loads(message)
            address = (host, port)
        client.settimeout(self.network_timeout_s)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in its own thread here, or hand it to a less busy receiver."""
        if self.dispatcher is not None:
            with self._count_lock:
                open_here = sum(self._connections.values()) - 1  # this one is counted already
            if self.dispatcher.hand_over(request, client_address, open_here):
                self._uncount(str(client_address[0]))
                request.close()  # the receiver holds its own descriptor now
                return
        super().process_request(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection unless its source address already holds ``max_per_address``."""
        address = str(client_address[0])
        with self._count_lock:
            if self._connections[address] >= self.max_per_address:
                refused = True
                self._count_ended()  # handed to us and finished here
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
            self._uncount(address)
            with self._count_lock:
                self._count_ended()

    def _uncount(self, address: str) -> None:
        with self._count_lock:
            self._connections[address] -= 1
            if self._connections[address] <= 0:
                del self._connections[address]

    def _count_ended(self) -> None:
        """A child receiver tells the main process a connection it was handed is finished (with
        ``_count_lock`` held: this process's threads are the counter's only writers)."""
        if self.ended is not None:
            self.ended.value += 1

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
