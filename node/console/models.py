"""The console's Models page: every model version, how routes use it (live, canary share,
shadow), what its jobs ended as, readers' rejections, its shadow comparisons and its drift, with
a chart of each drifting feature over time (server-rendered SVG). Nothing on it is PHI: model
names, versions, routes, descriptors of the input series and summaries of the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.monitoring.drift import DRIFT_ALERT
from node.monitoring.summary import Comparison, ModelSummary, comparisons, model_summaries
from node.routing.canary import algorithm_roles
from node.settings.config import Settings
from node.storage.index import Index

CHART_W, CHART_H, PAD = 360, 90, 6
CHARTS_PER_MODEL = 6
ROWS_SHOWN = 50


@dataclass(frozen=True)
class Chart:
    """One feature's values over time as SVG coordinates (numbers only): the values' polyline,
    the reference window's width, and the axis range."""

    feature: str
    psi: float
    points: str
    reference_x: float
    low: float
    high: float


@dataclass
class VersionView:
    """One model version as the page shows it."""

    summary: ModelSummary
    roles: list[str]
    charts: list[Chart] = field(default_factory=list)
    comparison: Comparison | None = None


def _chart(feature: str, psi: float, values: list[tuple[float, float]], reference_end: float | None) -> Chart:
    ys = [v for _t, v in values]
    low, high = min(ys), max(ys)
    span = (high - low) or 1.0
    n = max(1, len(values) - 1)
    points = " ".join(
        f"{PAD + i * (CHART_W - 2 * PAD) / n:.1f},{CHART_H - PAD - (v - low) / span * (CHART_H - 2 * PAD):.1f}"
        for i, (_t, v) in enumerate(values)
    )
    in_reference = sum(1 for t, _v in values if reference_end is not None and t <= reference_end)
    reference_x = PAD + max(0, in_reference - 1) * (CHART_W - 2 * PAD) / n if in_reference else 0.0
    return Chart(feature, psi, points, round(reference_x, 1), low, high)


def models_page(index: Index, settings: Settings) -> dict[str, Any]:
    """What the Models page shows (the template's context)."""
    roles = algorithm_roles(settings)
    declared = {key: (d.name or key, d.version or "(bundle)") for key, d in settings.models.items()}
    versions = []
    for summary in model_summaries(index, settings.monitoring):
        used = [f"{key}: {role}" for key in summary.algorithms for role in roles.get(key, [])]
        view = VersionView(summary, used or ["no route now"])
        psi = {d.feature: d.psi for d in summary.drift}
        # drifting first, then outputs that vary; a flat line (a constant) says least
        ranked = sorted(
            (f for f, v in summary.series.items() if len(v) > 1),
            key=lambda f: (
                -psi.get(f, 0),
                len({y for _t, y in summary.series[f]}) == 1,
                not f.startswith("output."),
                f,
            ),
        )
        view.charts = [_chart(f, psi.get(f, 0.0), summary.series[f], summary.reference_end)
                       for f in ranked[:CHARTS_PER_MODEL]]  # fmt: skip
        if summary.roles.get("shadow"):
            view.comparison = comparisons(index, summary.model, summary.version)
        versions.append(view)
    configured = sorted(
        {(key, *declared.get(key, (key, "")), "; ".join(r)) for key, r in roles.items()}
        | {(key, name, version, "no route") for key, (name, version) in declared.items() if key not in roles}
    )
    return {"versions": versions, "configured": configured, "threshold": DRIFT_ALERT, "rows_shown": ROWS_SHOWN,
            "chart": {"w": CHART_W, "h": CHART_H, "pad": PAD}}  # fmt: skip
