"""The console's "fetch and analyse": an operator asks the node to fetch a study from a
configured source (by Study Instance UID or Accession Number) so that it is analysed like a
pushed one. The request is checked (a UID by PS3.5's rule, an accession number by its VR's
length and characters), audited with who asked, and run in the background; the answer shows
counts, never the study's patient attributes."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from node.audit import APPLICATION_ACTIVITY, AuditEvent, Participant
from node.errors import AinodeError, InvalidInstanceError
from node.jobs.retrieve import Retriever, StudyQuery, fetch_all
from node.uids import check_uid

logger = logging.getLogger(__name__)

_ACCESSION = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
"""An Accession Number (SH: at most 16 characters, no backslash or control character)."""


def fetch_and_analyse(ctx: Any, user: Any, address: str, source: str, attribute: str, value: str) -> str:
    """Start fetching the study that ``attribute`` (``StudyInstanceUID`` or ``AccessionNumber``)
    ``value`` names from ``source``; returns what the page tells the operator.

    Raises
    ------
    InvalidInstanceError
        The value is no UID or accession number (a 400 page naming which).
    ConfigError
        No such source.
    """
    value = value.strip()
    if attribute == "StudyInstanceUID":
        query = StudyQuery(study_instance_uid=check_uid(value, "Study Instance UID"))
    elif attribute == "AccessionNumber" and _ACCESSION.match(value):
        query = StudyQuery(accession_number=value)
    else:
        raise InvalidInstanceError("give a Study Instance UID or an Accession Number (at most 16 characters)")
    retriever = Retriever(ctx.data, source)
    studies = retriever.find(query)
    pending = [s for s in studies if not s.held]
    text = f"fetch and analyse from source {source}: {len(studies)} study(ies) found, {len(pending)} to fetch"
    ctx.data.audit.record(AuditEvent(APPLICATION_ACTIVITY, "E", participants=[
        Participant(user.name, requestor=True, address=address)], description=text))  # fmt: skip
    logger.info(text)

    def run() -> None:
        try:
            fetched, failed = fetch_all(retriever, pending, 30.0, 1, lambda *_: None)
            logger.info("fetch and analyse: %d fetched, %d failed", fetched, failed)
        except AinodeError as exc:
            logger.error("fetch and analyse failed: %s", exc)
        finally:
            retriever.close()

    if pending:
        threading.Thread(target=run, name="ainode-fetch", daemon=True).start()
    held = len(studies) - len(pending)
    return (
        f"{len(pending)} study(ies) being fetched from {source}; {held} already held"
        if studies
        else (f"no study found at {source}")
    )
