"""The short text of a result's measurements that presentation states and key images show."""

from __future__ import annotations

from ainode_sdk.base import AlgorithmResult, Code

_UNIT_TEXT = {"[hnsf'U]": "HU"}


def unit_text(unit: Code) -> str:
    """How a UCUM unit reads on an image (``[hnsf'U]`` as HU, others by their UCUM code: ASCII,
    so the presentation state's text needs no Specific Character Set)."""
    return _UNIT_TEXT.get(unit[0], unit[0])


def measurement_lines(result: AlgorithmResult) -> dict[str, list[str]]:
    """One line per measurement, by measured label, in the algorithm's order.

    Returns
    -------
    dict
        Label to lines such as ``"Volume: 2400.1 ml"`` or ``"Attenuation Coefficient (Mean): -850.3 HU"``.
    """
    out: dict[str, list[str]] = {}
    for m in result.measurements:
        name = m.concept[2] + (f" ({m.derivation[2]})" if m.derivation else "")
        out.setdefault(m.segment_label, []).append(f"{name}: {format(m.value, '.6g')} {unit_text(m.unit)}".rstrip())
    return out
