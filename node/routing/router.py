"""Apply the configured routes to the series of a study.

Series-level routes are evaluated on each series' header; a study-level route matches a study when
any of its series matches, and then applies to every series of the study. In ``first_match`` mode
a series taken by one route is not offered to the routes after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydicom import Dataset

from node.routing.rules import header_of, keywords_of, matches, prepare
from node.settings.models import Route, Settings


@dataclass(frozen=True)
class RoutePlan:
    """A matched route and the series (by key) it applies to."""

    route: Route
    series_keys: tuple[str, ...]


def plan_routes(
    settings: Settings, headers: Mapping[str, Dataset], calling_ae_title: str, called_ae_title: str
) -> list[RoutePlan]:
    """Which routes apply to which series of a study.

    Parameters
    ----------
    headers
        One representative header per series, keyed by series key.
    """
    keywords = set().union(*(keywords_of(r.match) for r in settings.routes)) if settings.routes else set()
    flat = {key: prepare(header_of(ds, keywords, calling_ae_title, called_ae_title)) for key, ds in headers.items()}
    taken: set[str] = set()
    plans: list[RoutePlan] = []
    for route in settings.routes:
        free = [k for k in flat if k not in taken]
        matched = [k for k in free if matches(route.match, flat[k])]
        if route.level == "study" and matched:
            matched = free
        if not matched:
            continue
        plans.append(RoutePlan(route, tuple(matched)))
        if settings.routing.mode == "first_match":
            taken.update(matched)
    return plans
