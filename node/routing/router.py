"""Apply the configured routes to the series of a study: the one routing implementation.

Series-level routes are evaluated on each series' header; a study-level route matches a study when
any of its series matches, and then applies to every series of the study still on offer. In
``first_match`` mode a series taken by one route is not offered to the routes after it.

:func:`route_study` records, for every series and route, the verdict that led to the plan;
:func:`plan_routes` (the scheduler) and the dry run (``ainode route test``, which adds the
per-test explanation on top) both use it, so they cannot disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from node.conditions import header_of, keywords_of, matches, prepare
from node.settings.config import Settings
from node.settings.routes import Route


@dataclass(frozen=True)
class RoutePlan:
    """A matched route and the series (by key) it applies to."""

    route: Route
    series_keys: tuple[str, ...]


class Verdict(enum.StrEnum):
    """What one route decided for one series."""

    MATCH = "match"  # the series' own header matches the route's condition
    STUDY_LEVEL = "study-level"  # a study-level route matched another series of the study
    NO_MATCH = "no match"
    NOT_OFFERED = "not offered"  # first_match: an earlier route took the series


@dataclass(frozen=True)
class RoutingDecision:
    """The plans of a study and, per series key, each route's verdict in configuration order;
    ``headers`` are the flattened headers the conditions were evaluated on (values may be PHI)."""

    plans: list[RoutePlan]
    verdicts: dict[str, list[tuple[Route, Verdict]]]
    headers: dict[str, dict[str, Any]]


def route_study(
    settings: Settings, headers: Mapping[str, Dataset], calling_ae_title: str, called_ae_title: str
) -> RoutingDecision:
    """Which routes apply to which series of a study, and why.

    Parameters
    ----------
    headers
        One representative header per series of the study, keyed by series key.
    """
    keywords = set().union(*(keywords_of(r.match) for r in settings.routes)) if settings.routes else set()
    raw = {key: header_of(ds, keywords, calling_ae_title, called_ae_title) for key, ds in headers.items()}
    flat = {key: prepare(header) for key, header in raw.items()}
    taken: set[str] = set()
    plans: list[RoutePlan] = []
    verdicts: dict[str, list[tuple[Route, Verdict]]] = {key: [] for key in flat}
    for route in settings.routes:
        free = [k for k in flat if k not in taken]
        own = {k for k in free if matches(route.match, flat[k])}
        matched = free if route.level == "study" and own else [k for k in free if k in own]
        for key in flat:
            if key in taken:
                verdict = Verdict.NOT_OFFERED
            elif key in own:
                verdict = Verdict.MATCH
            elif key in matched:
                verdict = Verdict.STUDY_LEVEL
            else:
                verdict = Verdict.NO_MATCH
            verdicts[key].append((route, verdict))
        if not matched:
            continue
        plans.append(RoutePlan(route, tuple(matched)))
        if settings.routing.mode == "first_match":
            taken.update(matched)
    return RoutingDecision(plans, verdicts, raw)


def plan_routes(
    settings: Settings, headers: Mapping[str, Dataset], calling_ae_title: str, called_ae_title: str
) -> list[RoutePlan]:
    """The plans of :func:`route_study`."""
    return route_study(settings, headers, calling_ae_title, called_ae_title).plans


def completion_due(
    plans: list[RoutePlan], headers: Mapping[str, Dataset], first_received: float, last_received: float, now: float
) -> bool:
    """Whether a study the ``plans`` matched is complete by their routes' completion rules: every
    expected series is there and the longest quiet period has passed since ``last_received``, or
    the shortest maximum wait has passed since ``first_received`` (epoch s; ``headers``: one
    header per series)."""
    waits = [p.route.completion.max_wait_s for p in plans if p.route.completion.max_wait_s is not None]
    if waits and now - first_received >= min(waits):
        return True
    if now - last_received < max(p.route.completion.quiet_period_s for p in plans):
        return False
    for plan in plans:
        expected = plan.route.completion.expected_series
        if expected is not None and not any(
            matches(expected, prepare(header_of(ds, keywords_of(expected), "", ""))) for ds in headers.values()
        ):
            return False
    return True
