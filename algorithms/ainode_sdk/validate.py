"""What an algorithm's result must be for the node to build DICOM objects from it: mask and
label-map shapes, codes ``(value, scheme, meaning)``, UCUM units, finite values, measurement
groups that name a segment or a declared site. Used by ``ainode algorithms check``; a plugin
author can call it in their own tests.
"""

from __future__ import annotations

import math

from ainode_sdk.base import AlgorithmResult, Code, Volume


def _code_problem(code: object, what: str) -> str | None:
    if not (isinstance(code, tuple) and len(code) == 3 and all(isinstance(c, str) and c for c in code)):
        return f"{what}: not a (value, scheme, meaning) code: {code!r}"
    return None


def validate_result(result: AlgorithmResult, volume: Volume) -> list[str]:
    """What is wrong with an algorithm's result for ``volume``.

    Parameters
    ----------
    result
        What the algorithm returned.
    volume
        The volume it ran on, ``(slices, rows, columns)``.

    Returns
    -------
    list of str
        One line per problem; empty when the result can be built into SEG and SR.
    """
    problems: list[str] = []
    shape = volume.voxels.shape
    if result.label_map is not None and result.label_map.shape != shape:
        problems.append(f"label map has shape {result.label_map.shape}, the volume {shape}")
    labels = [s.label for s in result.segments]
    if len(set(labels)) != len(labels):
        problems.append("two segments share a label")
    for s in result.segments:
        if result.label_map is None and s.mask.shape != shape:
            problems.append(f"segment {s.label!r}: mask shape {s.mask.shape}, the volume {shape}")
        for what, code in (("category", s.category), ("property type", s.property_type)):
            problem = _code_problem(code, f"segment {s.label!r} {what}")
            if problem:
                problems.append(problem)
    groups = set(labels) | set(result.group_sites)
    for m in result.measurements:
        if m.segment_label not in groups:
            problems.append(f"measurement of {m.segment_label!r}: no such segment and no declared group site")
        if m.unit[1] != "UCUM":
            problems.append(f"measurement {m.concept[2]!r} of {m.segment_label!r}: unit {m.unit!r} is not UCUM")
        if not math.isfinite(m.value):
            problems.append(f"measurement {m.concept[2]!r} of {m.segment_label!r}: value {m.value!r} is not finite")
        problem = _code_problem(m.concept, f"measurement of {m.segment_label!r}")
        if problem:
            problems.append(problem)
    for f in result.findings:
        codes: tuple[tuple[str, Code], ...] = (("concept", f.concept), ("value", f.value))
        problems += [p for what, c in codes if (p := _code_problem(c, f"finding {f.label!r} {what}"))]
        if f.probability is not None and not 0 <= f.probability <= 1:
            problems.append(f"finding {f.label!r}: probability {f.probability} is not within 0-1")
    return problems
