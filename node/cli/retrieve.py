"""``ainode retrieve``: fetch studies from a configured source (``sources:``) so that they are
analysed like pushed ones — by Study Instance UID, Accession Number or a query — with a dry run,
a rate limit and progress lines."""

from __future__ import annotations

import argparse
import datetime
from typing import Any


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no date (YYYY-MM-DD)") from None


def cmd_retrieve(args: argparse.Namespace) -> int:
    from node import roles
    from node.jobs.retrieve import Retriever, StudyQuery, fetch_all

    data = roles.cli_data(args.config)
    retriever = Retriever(data, args.source)
    query = StudyQuery(args.study, args.accession, args.patient_id, args.modality, args.since, args.until)
    try:
        studies = retriever.find(query)
        held = sum(s.held for s in studies)
        print(f"source {args.source}: {len(studies)} matching study(ies), {held} already held")
        if args.dry_run or not studies:
            for s in studies:
                mark = "held " if s.held else "fetch"
                count = f"{s.instances} instances" if s.instances is not None else "instances ?"
                print(f"  {mark} {s.study_instance_uid}  {s.study_date or '--------'}  {s.modalities or '-':<6} "
                      f"{count:<14} {s.description}")  # fmt: skip
            return 0
        total = len(studies) - held

        def progress(done: int, study: Any, count: int | None, error: str | None) -> None:
            bar = "#" * int(20 * done / max(1, total))
            outcome = f"{count} instance(s)" if error is None else f"FAILED: {error}"
            print(f"[{bar:<20}] {done}/{total} {study.study_date or '--------'}: {outcome}", flush=True)

        fetched, failed = fetch_all(retriever, studies, args.per_minute, args.concurrent, progress)
    finally:
        retriever.close()
    print(f"{fetched} study(ies) fetched, {failed} failed; the node analyses them as they complete")
    return 1 if failed else 0


def register(sub: Any) -> None:
    """Add ``ainode retrieve`` to the ``ainode`` parser's sub-commands."""
    p = sub.add_parser("retrieve", help="fetch studies from a source (C-FIND + C-MOVE/C-GET, QIDO-RS + WADO-RS)")
    p.add_argument("--from", dest="source", required=True, help="a source named in the configuration's sources")
    p.add_argument("--config", required=True)
    which = p.add_argument_group("which studies (one of --study, --accession, or a query)")
    which.add_argument("--study", help="Study Instance UID")
    which.add_argument("--accession", help="Accession Number")
    which.add_argument("--patient-id")
    which.add_argument("--modality", help="e.g. CT")
    which.add_argument("--since", type=_date, help="study date from (YYYY-MM-DD)")
    which.add_argument("--until", type=_date, help="study date until (YYYY-MM-DD)")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched, fetch nothing")
    p.add_argument("--per-minute", type=float, default=30.0, help="studies started per minute at most")
    p.add_argument("--concurrent", type=int, default=2, help="retrievals at once")
    p.set_defaults(func=cmd_retrieve)
