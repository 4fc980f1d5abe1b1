"""``ainode models``: what the node has seen of each model version in clinical use — shadow
comparisons, drift against the reference window (and setting that window), readers' rejections."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from node.errors import AinodeError


def _data(config: str) -> Any:
    from node import roles

    return roles.cli_data(config)


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def cmd_models_compare(args: argparse.Namespace) -> int:
    from node.monitoring.summary import comparisons

    found = comparisons(_data(args.config).index, args.name, args.version, args.against)
    if not found.studies:
        raise AinodeError(f"no comparison of {args.name} {args.version or ''} against {args.against} yet".strip())
    print(f"{args.name} {args.version or '(every version)'} against {args.against}: {found.studies} studies, "
          f"{found.failures} failure(s)")  # fmt: skip
    print(
        f"{'job':>6}  {'segment':<28} {'Dice':>7} {'volume ml':>10} {'reference ml':>12} {'diff ml':>9} {'diff %':>7}"
    )
    for row in found.rows:
        if "error" in row:
            print(f"{row['job']:>6}  failed: {row['error']}")
            continue
        pair = f"{row['label']} vs {' + '.join(row['against'])}"[:28]
        diff_pct = _number(row["volume_diff_pct"], 1)
        print(f"{row['job']:>6}  {pair:<28} {_number(row['dice']):>7} {row['volume_ml']:>10.1f} "
              f"{row['reference_volume_ml']:>12.1f} {row['volume_diff_ml']:>9.1f} {diff_pct:>7}")  # fmt: skip
    print("summary:")
    for s in found.summary:
        print(f"  {s['pair']}: {s['studies']} studies; Dice median {_number(s['dice_median'])} "
              f"(5th {_number(s['dice_p05'])}, 95th {_number(s['dice_p95'])}); volume difference median "
              f"{_number(s['volume_diff_pct_median'], 1)} % (5th {_number(s['volume_diff_pct_p05'], 1)}, "
              f"95th {_number(s['volume_diff_pct_p95'], 1)})")  # fmt: skip
    return 0


def _when(text: str) -> float:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise AinodeError(f"{text!r} is no ISO 8601 date or time (e.g. 2026-11-01 or 2026-11-01T08:00)") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as an administrator writes it
    return moment.timestamp()


def cmd_models_baseline(args: argparse.Namespace) -> int:
    start, end = _when(args.since), _when(args.until)
    if end <= start:
        raise AinodeError("--until must be after --from")
    data = _data(args.config)
    data.index.set_baseline(args.name, args.version, start, end)
    from node.audit import APPLICATION_ACTIVITY, AuditEvent

    text = f"drift reference window of {args.name} {args.version} set: {args.since} .. {args.until}"
    data.audit.record(AuditEvent(APPLICATION_ACTIVITY, "U", description=text))
    print(f"{args.name} {args.version}: drift is now measured against the studies of {args.since} .. {args.until}")
    return 0


def cmd_models_drift(args: argparse.Namespace) -> int:
    from node.monitoring.summary import model_summaries

    data = _data(args.config)
    shown = 0
    for m in model_summaries(data.index, data.settings.monitoring):
        if (args.name and m.model != args.name) or (args.version and m.version != args.version):
            continue
        shown += 1
        window = "baseline dates" if m.baseline else "first jobs"
        print(f"{m.model} {m.version}: reference {m.reference_n} jobs ({window}), recent {m.recent_n}; "
              f"outcomes {dict(m.outcomes)}; recent failed {m.recent_ratios['failed']:.0%}, "
              f"refused {m.recent_ratios['refused']:.0%}, timed out {m.recent_ratios['timeout']:.0%}")  # fmt: skip
        for d in m.drift[: args.top]:
            flag = "  DRIFT" if d.psi > args.threshold else ""
            print(f"  {d.feature:<48} PSI {d.psi:8.3f}{flag}")
        for (code, reason), count in sorted(m.rejections.items()):
            print(f"  rejected by readers: {count} x {code} {reason}")
    if not shown:
        raise AinodeError("no records of that model yet" if args.name else "no model has run yet")
    return 0


def register(sub: Any) -> None:
    """Add ``ainode models`` to the ``ainode`` parser's sub-commands."""
    models = sub.add_parser("models", help="models in clinical use: comparisons, drift, baselines")
    actions = models.add_subparsers(dest="action", required=True)
    p = actions.add_parser("compare", help="a shadow version's comparison with its reference, per study and summary")
    p.add_argument("name", help="the model (its name, shared by its versions)")
    p.add_argument("--version", help="the shadow's version (default: every version)")
    p.add_argument("--against", required=True, help="the reference: the live algorithm or model it shadows")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_models_compare)
    p = actions.add_parser("baseline", help="set the drift reference window of a model version to these dates")
    p.add_argument("name")
    p.add_argument("--version", required=True)
    p.add_argument("--from", dest="since", required=True, help="ISO 8601 date or time, local unless it says")
    p.add_argument("--until", required=True)
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_models_baseline)
    p = actions.add_parser("drift", help="each feature's PSI, recent window vs reference, largest first")
    p.add_argument("name", nargs="?")
    p.add_argument("--version")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.25, help="PSI above which a feature is flagged")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_models_drift)
