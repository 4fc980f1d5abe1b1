"""Drift of a model version: the population stability index (PSI) of each input descriptor and
output value between a reference window and the recent one.

PSI = sum over bins of (q - p) * ln(q / p), with p the reference's and q the recent window's
share of each bin (a share of 0 is smoothed by half a count). Numeric features are binned at the
reference's quantiles (``bins`` of them); a feature with at most ``bins`` distinct reference
values, and every text feature, is compared value by value. The usual reading: below 0.1 stable,
0.1-0.25 a moderate shift, above 0.25 a significant one (the shipped alert rule's threshold,
``deploy/prometheus/ainode-models.rules.yml``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.storage.tables import ModelRecordRow

DRIFT_ALERT = 0.25
"""The PSI above which a feature counts as drifted: the shipped alert rule's threshold."""
ANALYSED = ("analysed", "delivered")
"""Outcomes of a record whose model ran to the end (its outputs are summarised)."""


def features(record: ModelRecordRow) -> dict[str, float | str]:
    """The record's features: ``input.NAME`` (descriptors), ``output.LABEL.STAT`` (segment
    summaries), ``output.MEASUREMENT``, ``finding.LABEL`` and ``run.inference_s``."""
    inputs: dict[str, Any] = json.loads(record.inputs or "{}")
    outputs: dict[str, Any] = json.loads(record.outputs or "{}")
    found: dict[str, float | str] = {f"input.{k}": v for k, v in inputs.items() if v is not None}
    for label, stats in outputs.get("segments", {}).items():
        found.update({f"output.{label}.{k}": v for k, v in stats.items() if k != "voxels"})
    found.update({f"output.{k}": v for k, v in outputs.get("measurements", {}).items()})
    found.update({f"finding.{k}": v for k, v in outputs.get("findings", {}).items()})
    if record.inference_s is not None:
        found["run.inference_s"] = round(record.inference_s, 3)
    return found


def psi(reference: Sequence[float | str], recent: Sequence[float | str], bins: int = 10) -> float:
    """The population stability index of ``recent`` against ``reference`` (see the module)."""
    if not reference or not recent:
        return 0.0
    numeric = all(isinstance(v, int | float) for v in (*reference, *recent))
    if numeric and len(set(reference)) > bins:
        ref = np.asarray(reference, dtype=float)
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
        p_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1)
        q_counts = np.bincount(
            np.searchsorted(edges, np.asarray(recent, dtype=float), side="right"), minlength=len(edges) + 1
        )
        pairs = list(zip(p_counts.tolist(), q_counts.tolist(), strict=True))
    else:
        p_count, q_count = Counter(map(str, reference)), Counter(map(str, recent))
        pairs = [(p_count[k], q_count[k]) for k in sorted(set(p_count) | set(q_count))]
    n_p, n_q, k = len(reference), len(recent), len(pairs)
    total = 0.0
    for a, b in pairs:
        p, q = (a + 0.5) / (n_p + 0.5 * k), (b + 0.5) / (n_q + 0.5 * k)
        total += (q - p) * math.log(q / p)
    return round(total, 4)


@dataclass(frozen=True)
class Windows:
    """The reference and recent records of one model version."""

    reference: list[ModelRecordRow]
    recent: list[ModelRecordRow]


def windows(
    records: Sequence[ModelRecordRow], reference_n: int, recent_n: int, baseline: tuple[float, float] | None = None
) -> Windows:
    """Split a model version's records (oldest first) into its windows: the reference — those
    inside ``baseline`` (epoch seconds), else the first ``reference_n`` — and the most recent
    ``recent_n`` after it (none until there are records past the reference)."""
    if baseline is not None:
        reference = [r for r in records if baseline[0] <= r.recorded_at <= baseline[1]]
        later = [r for r in records if r.recorded_at > baseline[1]]
    else:
        reference, later = list(records[:reference_n]), list(records[reference_n:])
    return Windows(reference, later[-recent_n:])


@dataclass(frozen=True)
class FeatureDrift:
    """The drift of one feature: its PSI and the records it was computed from."""

    feature: str
    psi: float
    reference_n: int
    recent_n: int


def drift(w: Windows, bins: int = 10) -> list[FeatureDrift]:
    """The PSI of every feature the reference window's analysed records have, largest first."""
    reference = [features(r) for r in w.reference if r.outcome in ANALYSED]
    recent = [features(r) for r in w.recent if r.outcome in ANALYSED]
    if not reference or not recent:
        return []
    names = sorted({k for f in reference for k in f})
    rows = []
    for name in names:
        a = [f[name] for f in reference if name in f]
        b = [f[name] for f in recent if name in f]
        if b:
            rows.append(FeatureDrift(name, psi(a, b, bins), len(a), len(b)))
    return sorted(rows, key=lambda d: (-d.psi, d.feature))


def outcome_ratios(records: Sequence[ModelRecordRow]) -> dict[str, float]:
    """Share of ``failed``, ``refused``, ``timeout`` and ``quarantined`` records among ``records``."""
    counts = Counter(r.outcome for r in records)
    n = max(1, len(records))
    return {outcome: round(counts[outcome] / n, 4) for outcome in ("failed", "refused", "timeout", "quarantined")}
