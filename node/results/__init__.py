"""Result objects (DICOM SEG, TID 1500 SR, IOCM rejection notes). The only package that imports highdicom."""

from __future__ import annotations

from node.results.kos import build_rejection_note
from node.results.seg import build_segmentation
from node.results.sr import build_measurement_report

__all__ = ["build_measurement_report", "build_rejection_note", "build_segmentation"]
