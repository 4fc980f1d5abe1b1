"""Result objects (DICOM SEG and TID 1500 SR). The only package that imports highdicom."""

from __future__ import annotations

from node.results.seg import build_segmentation
from node.results.sr import build_measurement_report

__all__ = ["build_measurement_report", "build_segmentation"]
