"""Associations this node requests (as an SCU, or to send a storage commitment report): the
peer's address, TCP_NODELAY, DICOM TLS, and a clear error when the association is not made."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import Event

from node.errors import RetrieveError
from node.network.acceptance import remember_acceptance
from node.network.polling import back_off_polling
from node.network.uid_checks import memoise_uid_checks

# every module of this package that makes or accepts an association imports this one: the UID
# checks of negotiation are memoised, a repeated A-ASSOCIATE-RQ is accepted from memory and the
# reactors' polling backs off, once, for all of them
memoise_uid_checks()
remember_acceptance()
back_off_polling()


def set_tcp_nodelay(event: Event) -> None:
    """Disable Nagle's algorithm on an association's socket (avoids ~40 ms stalls per PDU)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Peer:
    """Where a source listens: its AE title, host and port, and TLS (``None``: none)."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None


def associate(ae: AE, peer: Peer, handlers: list[Any] | None = None, roles: list[Any] | None = None) -> Any:
    """An association of ``ae`` with ``peer`` (TCP_NODELAY, TLS when the peer has it).

    Raises
    ------
    RetrieveError
        It was rejected, aborted or could not be made.
    """
    ae.acse_timeout = ae.network_timeout = 60
    ae.dimse_timeout = 600  # a C-MOVE's final response comes when the whole study has been sent
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), *(handlers or [])],
                         tls_args=(peer.tls, peer.host) if peer.tls is not None else None)  # fmt: skip
    if not assoc.is_established:
        raise RetrieveError(f"association with {peer.ae_title} at {peer.host}:{peer.port} not established")
    return assoc
