"""STOW-RS ingest (PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{uid}`` on the
console's port, into the same path as a C-STORE.

Each request is authenticated before a byte of its body is read: a bearer token whose SHA-256 a
configured client has (``dicomweb.clients``; the client's name is the calling AE title the
routes, the audit and the metrics see). No token: 401; a token nobody has: 403. The body is
``multipart/related; type="application/dicom"``, parsed as it streams (python-multipart); each
part is kept like a C-STORE's data set (:class:`~node.network.dataset.DataSetBuffer`: memory up to
16 MiB, then the encrypted spool, nothing beyond ``dicomweb.max_instance_bytes``) and handed to
the receiver as a :class:`~node.instances.ReceivedInstance`, which stores it encrypted and
durably before the next part is read. A declared Content-Length over
``dicomweb.max_request_bytes`` is refused (413) before reading; a streamed body that grows past it
is cut off (413).

The answer lists what was stored (Referenced SOP Sequence) and what was not with its Failure
Reason (Failed SOP Sequence): 0xA700 out of resources (the disk watermark), 0xA900 the data set
does not match its SOP class, 0xC000 cannot be understood (a bad UID, a part too large, not
DICOM). 200 when every instance was stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets as _secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom import Dataset
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from node.errors import AinodeError, InvalidInstanceError
from node.instances import ReceivedInstance
from node.network.dataset import DataSetBuffer, SpoolLike
from node.network.scp import read_header
from node.network.status import status_for
from node.settings.config import Settings
from node.uids import check_uid

logger = logging.getLogger(__name__)

PREFIX = "/dicomweb/"
SOP_CLASS_NOT_SUPPORTED = 0x0122
"""PS3.18 Failure Reason of an instance of a SOP class the node does not take."""
_STUDIES = re.compile(r"^(?:/dicomweb)?/studies(?:/([0-9.]{1,64}))?/?$")


class Receiving(Protocol):
    """What STOW-RS needs of the node's receiving side (:class:`node.receiver.Receiver`)."""

    def receive(self, instance: ReceivedInstance) -> None:
        """Store ``instance`` durably (or take it as feedback); raises :class:`AinodeError`."""
        ...

    def transfer_ended(self, calling: str, address: str, transfer_id: int) -> None:
        """Audit what one request (one "association") stored."""
        ...


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a bearer token, as ``dicomweb.clients[].token_sha256`` holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    buffer: DataSetBuffer | None = None


@dataclass
class _Outcome:
    stored: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)

    def body(self) -> bytes:
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_item(c, i) for c, i in self.stored]
        if self.failed:
            ds.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in self.failed]
        return json.dumps(ds.to_json_dict()).encode()


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    if sop_class:  # a part that could not be read has neither: its Failure Reason says so
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


class StowApp:
    """The ASGI application behind :data:`PREFIX` (see the module docstring)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        receiver: Receiving,
        spool: Callable[[], SpoolLike] | None,
        sop_classes: frozenset[str],
    ) -> None:
        self.settings, self.receiver, self.spool, self.sop_classes = settings, receiver, spool, sop_classes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        match = _STUDIES.match(scope["path"])
        if match is None:
            await _answer(send, 404, {"detail": "not found"})
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"detail": "STOW-RS takes POST"}, {"Allow": "POST"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        calling = self._client(headers.get("authorization", ""))
        if calling is None or calling == "":
            code, text = (401, "a bearer token is required") if calling is None else (403, "token not accepted")
            extra = {"WWW-Authenticate": 'Bearer realm="ainode STOW-RS"'} if code == 401 else {}
            logger.warning("STOW-RS refused: %s", text)
            await _answer(send, code, {"detail": text}, {**extra, "Connection": "close"})
            return
        config = self.settings().dicomweb
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_request_bytes:
            logger.warning("STOW-RS refused: body of %s bytes over dicomweb.max_request_bytes", declared,
                           extra={"calling_ae": calling})  # fmt: skip
            await _answer(send, 413, {"detail": f"request over {config.max_request_bytes} bytes"},
                          {"Connection": "close"})  # fmt: skip
            return
        kind, options = parse_options_header(headers.get("content-type", ""))
        if (
            kind != b"multipart/related"
            or options.get(b"type", b"application/dicom") != b"application/dicom"
            or (b"boundary" not in options)
        ):
            await _answer(send, 415, {"detail": 'the body must be multipart/related; type="application/dicom"'})
            return
        study = match.group(1)
        if study is not None:
            try:
                check_uid(study, "Study Instance UID of the request")
            except InvalidInstanceError as exc:
                await _answer(send, 400, {"detail": str(exc)})
                return
        client = scope.get("client") or ("", 0)
        await self._store(scope, receive, send, options[b"boundary"], calling, str(client[0]), study)

    def _client(self, authorization: str) -> str | None:
        """The client a bearer token belongs to; ``None`` without a token, ``""`` for an unknown one."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_digest(token.strip())
        for client in self.settings().dicomweb.clients:
            if hmac.compare_digest(digest, client.token_sha256):
                return client.name
        return ""

    async def _store(
        self, scope: Any, receive: Any, send: Any, boundary: bytes, calling: str, address: str, study: str | None
    ) -> None:
        config = self.settings().dicomweb
        transfer_id = _secrets.randbits(62)
        outcome = _Outcome()
        finished: list[_Part] = []
        current: list[_Part] = []
        header_field = bytearray()
        header_value = bytearray()

        def on_part_begin() -> None:
            current[:] = [_Part(buffer=DataSetBuffer(config.max_instance_bytes, self.spool))]

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header_field.extend(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header_value.extend(data[start:end])

        def on_header_end() -> None:
            current[0].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
            header_field.clear()
            header_value.clear()

        def on_part_data(data: bytes, start: int, end: int) -> None:
            buffer = current[0].buffer
            if buffer is not None:
                buffer.write(data[start:end])

        def on_part_end() -> None:
            finished.append(current[0])

        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        })  # fmt: skip
        received = 0
        too_large = False
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away: what was answered nothing for is not counted
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > config.max_request_bytes:
                    too_large = True
                    break
                parser.write(chunk)
                while finished:
                    await self._one(finished.pop(0), calling, transfer_id, study, outcome)
                if not message.get("more_body", False):
                    break
        except ValueError as exc:  # the multipart framing is broken
            logger.warning("STOW-RS body cannot be parsed: %s", exc, extra={"calling_ae": calling})
            await _answer(send, 400, {"detail": "the multipart body cannot be parsed"})
            return
        finally:
            for part in [*finished, *current]:
                if part.buffer is not None:
                    part.buffer.discard()
            await run_in_threadpool(self.receiver.transfer_ended, calling, address, transfer_id)
        if too_large:
            logger.warning("STOW-RS body cut off over dicomweb.max_request_bytes", extra={"calling_ae": calling})
            await _answer(send, 413, {"detail": f"request over {config.max_request_bytes} bytes"},
                          {"Connection": "close"})  # fmt: skip
            return
        if not outcome.stored and not outcome.failed:
            await _answer(send, 400, {"detail": "the body holds no DICOM part"})
            return
        status = 200 if not outcome.failed else 202 if outcome.stored else 409
        logger.info("STOW-RS: %d stored, %d failed", len(outcome.stored), len(outcome.failed),
                    extra={"calling_ae": calling})  # fmt: skip
        await _send(send, status, outcome.body(), "application/dicom+json")

    async def _one(self, part: _Part, calling: str, transfer_id: int, study: str | None, outcome: _Outcome) -> None:
        """Store one part (in a worker thread: the store's fsync must not hold the event loop)."""
        buffer = part.buffer
        if buffer is None:
            return
        sop_class = sop_instance = ""
        try:
            kind, _options = parse_options_header(part.headers.get("content-type", "application/dicom"))
            if kind != b"application/dicom":
                raise InvalidInstanceError(f"a part of type {kind.decode('latin-1')[:40]} is no DICOM instance")
            buffer.check()
            encoded = buffer.getvalue()
            ds = read_header(encoded)
            sop_class = str(ds.get("SOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", ""))
            if sop_class not in self.sop_classes:
                logger.warning("STOW-RS instance refused: SOP class not supported", extra={"calling_ae": calling})
                outcome.failed.append((sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED))
                return
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            if not syntax:
                raise InvalidInstanceError("a part without a File Meta Information header (PS3.10)")
            if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
                raise InvalidInstanceError("Study Instance UID differs from the request's")
            instance = ReceivedInstance.from_header(
                ds, encoded, sop_class_uid=sop_class, transfer_syntax_uid=syntax, calling_ae_title=calling,
                association_id=transfer_id, size=buffer.received,
                parts=buffer.parts if buffer.spooled else None,
            )  # fmt: skip
            await run_in_threadpool(self.receiver.receive, instance)
            outcome.stored.append((sop_class, sop_instance))
        except AinodeError as exc:
            status = status_for(exc)
            logger.warning("STOW-RS instance refused (%s): %s", status.name, exc, extra={"calling_ae": calling})
            outcome.failed.append((sop_class, sop_instance, int(status)))
        finally:
            buffer.discard()


async def _answer(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(body).encode(), "application/json", headers)


async def _send(send: Any, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
