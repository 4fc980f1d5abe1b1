"""Per model and version: what its records, rejections and shadow comparisons add up to — the
figures the metrics, the console's Models page and ``ainode models`` show."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.monitoring.drift import FeatureDrift, Windows, drift, features, outcome_ratios, windows
from node.settings.config import Monitoring
from node.storage.index import Index
from node.storage.tables import ModelRecordRow


@dataclass
class ModelSummary:
    """One model version's monitoring figures (see :func:`model_summaries`)."""

    model: str
    version: str
    algorithms: list[str]
    outcomes: Counter[str]
    roles: Counter[str]
    role_outcomes: Counter[tuple[str, str]]
    recent_ratios: dict[str, float]
    inference_s: dict[str, float | None]
    """Median seconds per run in the ``reference`` and ``recent`` windows."""
    drift: list[FeatureDrift]
    rejections: Counter[tuple[str, str]]
    reference_n: int
    recent_n: int
    baseline: tuple[float, float] | None
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Numeric feature -> (recorded at, value) of every analysed record, for the charts."""
    reference_end: float | None = None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def model_summaries(index: Index, monitoring: Monitoring) -> list[ModelSummary]:
    """Every model version the index has records of, with its windows' drift (shadow runs
    included: a silent trial is watched like a live version)."""
    grouped: dict[tuple[str, str], list[ModelRecordRow]] = defaultdict(list)
    for record in index.model_records():
        grouped[(record.model, record.version)].append(record)
    rejected: dict[tuple[str, str], Counter[tuple[str, str]]] = defaultdict(Counter)
    for row in index.rejections():
        rejected[(row.model, row.version)][(row.reason_code, row.reason)] += 1
    baselines = index.baselines()
    out = []
    for (model, version), records in sorted(grouped.items()):
        baseline = baselines.get((model, version))
        w: Windows = windows(records, monitoring.reference_studies, monitoring.recent_studies, baseline)
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in records:
            if r.outcome in ("analysed", "delivered"):
                for name, value in features(r).items():
                    if isinstance(value, int | float):
                        series[name].append((r.recorded_at, float(value)))
        out.append(
            ModelSummary(
                model=model, version=version, algorithms=sorted({r.algorithm for r in records}),
                outcomes=Counter(r.outcome for r in records), roles=Counter(r.role for r in records),
                role_outcomes=Counter((r.role, r.outcome) for r in records),
                recent_ratios=outcome_ratios(w.recent),
                inference_s={"reference": _median([r.inference_s for r in w.reference]),
                             "recent": _median([r.inference_s for r in w.recent])},
                drift=drift(w, monitoring.bins), rejections=rejected.get((model, version), Counter()),
                reference_n=len(w.reference), recent_n=len(w.recent), baseline=baseline, series=dict(series),
                reference_end=w.reference[-1].recorded_at if w.reference else None,
            )
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class Comparison:
    """A shadow version's comparisons with its reference: one row per study and segment pair,
    and per segment pair the summary (studies, Dice median and 5th/95th percentiles, volume
    difference median in %); ``failures`` counts shadow jobs without a comparison's figures."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    studies: int
    failures: int


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def comparisons(index: Index, model: str, version: str | None = None, against: str | None = None) -> Comparison:
    """The shadow comparisons of ``model`` (``version``) against ``against`` (an algorithm or
    model name; any when ``None``)."""
    rows: list[dict[str, Any]] = []
    failures = 0
    studies = 0
    for record in index.model_records(model, version, role="shadow"):
        if record.comparison is None:
            continue  # its study is still being analysed
        data = json.loads(record.comparison)
        reference = str(data.get("reference") or record.against or "")
        if against is not None and against not in (record.against, reference):
            continue
        studies += 1
        if "error" in data:
            failures += 1
            rows.append({"job": record.job_id, "error": data["error"]})
            continue
        for seg in data.get("segments", []):
            rows.append({"job": record.job_id, "reference_job": data.get("reference_job"), **seg})
    by_pair: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "label" in row:
            by_pair[f"{row['label']} vs {' + '.join(row['against'])}"].append(row)
    summary = []
    for pair, items in sorted(by_pair.items()):
        dice = [r["dice"] for r in items if r.get("dice") is not None]
        diff = [r["volume_diff_pct"] for r in items if r.get("volume_diff_pct") is not None]
        summary.append({"pair": pair, "studies": len(items), "dice_median": _pct(dice, 50), "dice_p05": _pct(dice, 5),
                        "dice_p95": _pct(dice, 95), "volume_diff_pct_median": _pct(diff, 50),
                        "volume_diff_pct_p05": _pct(diff, 5), "volume_diff_pct_p95": _pct(diff, 95)})  # fmt: skip
    return Comparison(rows, summary, studies, failures)
