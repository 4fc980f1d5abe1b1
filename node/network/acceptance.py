"""pynetdicom's acceptance of an association, remembered for senders that repeat themselves.

A PACS or modality that opens an association per instance (or per series) sends the same
A-ASSOCIATE-RQ PDU every time: the same AE titles, the same ~120 proposed presentation contexts,
the same user information. pynetdicom 3.0.4 nevertheless decodes it item by item, builds its
A-ASSOCIATE primitive, negotiates every presentation context against ours and builds and encodes
the A-ASSOCIATE-AC each time: ~4–10 ms of Python per association on this project's benchmark
machines (``bench/associations.py``), twice Orthanc's whole cost of an association.

Each of those four steps is a function of its input alone, so this module remembers its result for
the last :data:`REMEMBERED` distinct inputs and gives every association its own copy:

- decoding the A-ASSOCIATE-RQ and making its primitive (PS3.8 9.3.2), keyed by the PDU's exact
  bytes; a request that carries User Identity Negotiation (PS3.7 D.3.3.7: a password, a token) is
  never kept;
- the presentation-context negotiation (PS3.8 9.3.2.2, ``negotiate_as_acceptor``), keyed by every
  attribute of the proposed contexts, our supported contexts and the proposed SCP/SCU roles;
- the A-ASSOCIATE-AC's encoding (PS3.8 9.3.3), keyed by every attribute of the primitive it is
  built from (AE titles, results, user information); one that answers User Identity Negotiation,
  or holds a value that is not plain, is built every time.

Everything that depends on more than those inputs still runs for every association: the calling
and called AE titles against the peer rules (address, TLS subject), the association limit, User
Identity checks, the events. pynetdicom's standard logging handlers, which format a dump of every
PDU and DIMSE message for its own DEBUG log, are switched off (``LOG_HANDLER_LEVEL``): the node
logs pynetdicom at WARNING only (:mod:`node.logs`), so they only cost CPU.

Installed by :func:`remember_acceptance` when :mod:`node.network.association` is imported, for
pynetdicom 3.0.4 only (the internals it replaces are that version's); with another version
pynetdicom runs as it is and :func:`remember_acceptance` returns ``False``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar, cast

import pynetdicom
from pynetdicom import _config as pynetdicom_config
from pynetdicom import acse as pynetdicom_acse
from pynetdicom import evt
from pynetdicom import fsm as pynetdicom_fsm
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

PYNETDICOM_VERSION = "3.0.4"
"""The pynetdicom release whose internals :func:`remember_acceptance` replaces."""

REMEMBERED = 32
"""Distinct inputs remembered per step (least recently used forgotten first). An A-ASSOCIATE-RQ is
at most 64 KiB (:data:`node.network.transport.MAX_ASSOCIATE_RQ_BYTES`)."""

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
V = TypeVar("V")


class Remembered(Generic[K, V]):
    """A bounded, thread-safe map of the last ``size`` keys used (least recently used dropped)."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The value remembered for ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key``, forgetting the least recently used beyond ``size``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def frozen(item: object) -> tuple[Any, ...]:
    """Every attribute of a pynetdicom primitive or presentation context, as a hashable key.

    Raises
    ------
    TypeError
        If an attribute is not a plain value (str, int, bool, bytes, None, or a list of them).
    """
    key = (type(item), *((n, tuple(v) if isinstance(v, list) else v) for n, v in vars(item).items()))
    hash(key)  # raises TypeError for anything unhashable inside
    return key


def own_copy(item: T) -> T:
    """A pynetdicom primitive's own copy: a new object with new lists holding the same
    (immutable) values, such as UIDs."""
    copied = cast(T, object.__new__(type(item)))
    copied.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in vars(item).items()})
    return copied


def copy_context(context: PresentationContext) -> PresentationContext:
    """A presentation context's own copy (a :class:`~pynetdicom.presentation.PresentationContext`
    whatever the subclass), by its one list, the transfer syntaxes: :func:`own_copy` at a third of
    its cost, for the ~120 contexts every association copies."""
    copied = object.__new__(PresentationContext)
    attributes = copied.__dict__
    attributes.update(vars(context))
    attributes["_transfer_syntax"] = list(attributes["_transfer_syntax"])
    return copied


CONTEXT_ATTRIBUTES = (
    "_context_id",
    "_abstract_syntax",
    "_transfer_syntax",
    "result",
    "_scu_role",
    "_scp_role",
    "_as_scp",
    "_as_scu",
)
"""Every attribute of a pynetdicom 3.0.4 presentation context (checked by :func:`remember_acceptance`)."""


def _contexts_key(contexts: list[PresentationContext]) -> tuple[Any, ...]:
    """Every value of every context: the values of :func:`frozen` of each, without their names
    (``tests/test_acceptance.py`` checks that they are the same), built faster."""
    return tuple(
        (a["_context_id"], a["_abstract_syntax"], tuple(a["_transfer_syntax"]), a["result"],
         a["_scu_role"], a["_scp_role"], a["_as_scp"], a["_as_scu"])
        for a in map(vars, contexts)
    )  # fmt: skip


def copy_request(primitive: A_ASSOCIATE) -> A_ASSOCIATE:
    """An A-ASSOCIATE primitive's own copy (its lists, contexts and user information items)."""
    copied = A_ASSOCIATE.__new__(A_ASSOCIATE)
    copied.__dict__.update(vars(primitive))
    copied._presentation_context_definition_list = list(
        map(copy_context, primitive.presentation_context_definition_list)
    )
    copied._presentation_context_definition_results_list = list(
        map(copy_context, primitive.presentation_context_definition_results_list)
    )
    copied._user_information = [own_copy(item) for item in primitive.user_information]
    return copied


REQUESTS: Remembered[bytes, tuple[A_ASSOCIATE_RQ, A_ASSOCIATE]] = Remembered()
"""A-ASSOCIATE-RQ PDU bytes -> (its decoded PDU, its primitive), neither ever handed out."""
NEGOTIATIONS: Remembered[tuple[Any, ...], tuple[list[PresentationContext], list[Any]]] = Remembered()
"""Negotiation input -> (result contexts, SCP/SCU role items), never handed out."""
ACCEPTS: Remembered[tuple[Any, ...], tuple[A_ASSOCIATE_AC, bytes]] = Remembered()
"""A-ASSOCIATE (accept) primitive -> (its A-ASSOCIATE-AC PDU, encoded), never handed out."""


def _carries_user_identity(primitive: A_ASSOCIATE) -> bool:
    return any(isinstance(item, UserIdentityNegotiation) for item in primitive.user_information)


def remembering_decoder(dul: DULServiceProvider) -> Callable[[bytearray], tuple[Any, str]]:
    """``dul._decode_pdu`` that decodes an A-ASSOCIATE-RQ seen before from memory.

    The PDU handed on is an :class:`~pynetdicom.pdu.A_ASSOCIATE_RQ` sharing the remembered one's
    items, whose ``to_primitive`` returns a copy of the remembered primitive; any other PDU, and an
    RQ not seen before, is decoded by pynetdicom (an undecodable PDU raises as before, and is not
    remembered).
    """
    decode = dul._decode_pdu

    def decode_pdu(bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] != b"\x01":
            return decode(bytestream)
        data = bytes(bytestream)
        known = REQUESTS.get(data)
        if known is None:
            decoded, event = decode(bytestream)
            request = cast(A_ASSOCIATE_RQ, decoded)
            primitive = request.to_primitive()
            if not _carries_user_identity(primitive):
                REQUESTS.put(data, (request, copy_request(primitive)))
            handed = own_copy(request)  # the remembered PDU stays as decoded
            handed.to_primitive = lambda: primitive  # type: ignore[method-assign]  # made once, not twice
            return handed, event
        evt.trigger(dul.assoc, evt.EVT_DATA_RECV, {"data": data})
        remembered_pdu, remembered_primitive = known
        pdu = A_ASSOCIATE_RQ.__new__(A_ASSOCIATE_RQ)
        pdu.__dict__.update(vars(remembered_pdu))
        pdu.to_primitive = lambda: copy_request(remembered_primitive)  # type: ignore[method-assign]
        evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"

    return decode_pdu


def remembered_negotiation(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[Any, tuple[bool | None, bool | None]] | None = None,
) -> tuple[list[PresentationContext], list[Any]]:
    """:func:`pynetdicom.presentation.negotiate_as_acceptor`, remembered (see the module)."""
    try:
        key = (_contexts_key(rq_contexts), _contexts_key(ac_contexts), tuple(sorted((roles or {}).items())))
        hash(key)
    except TypeError:  # a value that is not plain: negotiate without remembering
        return negotiate_as_acceptor(rq_contexts, ac_contexts, roles)
    known = NEGOTIATIONS.get(key)
    if known is None:
        results, role_items = negotiate_as_acceptor(rq_contexts, ac_contexts, roles)
        NEGOTIATIONS.put(key, (list(map(copy_context, results)), [own_copy(r) for r in role_items]))
        return results, role_items
    return list(map(copy_context, known[0])), [own_copy(r) for r in known[1]]


_LISTS = ("_presentation_context_definition_list", "_presentation_context_definition_results_list", "_user_information")


def _accept_key(primitive: A_ASSOCIATE) -> tuple[Any, ...] | None:
    """Every value the A-ASSOCIATE-AC is built from; ``None`` if one is not a plain value or it
    answers User Identity Negotiation."""
    if _carries_user_identity(primitive):
        return None
    try:
        fields = tuple((name, value) for name, value in vars(primitive).items() if name not in _LISTS)
        hash(fields)
        return (
            fields,
            _contexts_key(primitive.presentation_context_definition_list),
            _contexts_key(primitive.presentation_context_definition_results_list),
            tuple(frozen(item) for item in primitive.user_information),
        )
    except TypeError:
        return None


def remembered_accept(primitive: A_ASSOCIATE) -> A_ASSOCIATE_AC:
    """``A_ASSOCIATE_AC(primitive)`` whose encoding is remembered (see the module): a real
    :class:`~pynetdicom.pdu.A_ASSOCIATE_AC` whose ``encode`` returns the remembered bytes."""
    key = _accept_key(primitive)
    known = ACCEPTS.get(key) if key is not None else None
    if known is None:
        built = A_ASSOCIATE_AC(primitive)
        known = built, built.encode()
        if key is not None:
            ACCEPTS.put(key, known)
    remembered_pdu, encoded = known
    pdu = own_copy(remembered_pdu)  # the remembered PDU stays as built
    pdu.encode = lambda: encoded  # type: ignore[method-assign]
    return pdu


_installed = False
_install_lock = threading.Lock()


def remember_acceptance() -> bool:
    """Remember negotiation and A-ASSOCIATE-AC encodings process-wide and switch pynetdicom's
    standard logging handlers off (idempotent). The A-ASSOCIATE-RQ decoder is per association:
    :func:`remembering_decoder`, set by :mod:`node.network.transport`.

    Returns
    -------
    bool
        Whether the pynetdicom in use is :data:`PYNETDICOM_VERSION` and the steps are remembered.
    """
    global _installed
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"  # a public setting: no per-PDU debug dumps
    if pynetdicom.__version__ != PYNETDICOM_VERSION or tuple(vars(PresentationContext())) != CONTEXT_ATTRIBUTES:
        return False
    with _install_lock:
        if not _installed:
            pynetdicom_acse.negotiate_as_acceptor = remembered_negotiation
            pynetdicom_fsm.A_ASSOCIATE_AC = remembered_accept  # type: ignore[assignment,misc]
            _installed = True
    return True


def installed() -> bool:
    """Whether :func:`remember_acceptance` replaced pynetdicom's steps in this process."""
    return _installed
