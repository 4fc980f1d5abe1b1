"""Codes that several algorithms use in their measurements (SNOMED CT, DCM, UCUM), as plain tuples."""

from __future__ import annotations

from ainode_sdk.base import Code

ANATOMICAL_STRUCTURE: Code = ("123037004", "SCT", "Anatomical Structure")
VOLUME: Code = ("118565006", "SCT", "Volume")
ATTENUATION: Code = ("112031", "DCM", "Attenuation Coefficient")
SIGNAL_INTENSITY: Code = ("130053", "DCM", "Signal Intensity")
MEAN: Code = ("373098007", "SCT", "Mean")
MEDIAN: Code = ("373099004", "SCT", "Median")
STANDARD_DEVIATION: Code = ("386136009", "SCT", "Standard Deviation")
MINIMUM: Code = ("255605001", "SCT", "Minimum")
MAXIMUM: Code = ("56851009", "SCT", "Maximum")

ML: Code = ("ml", "UCUM", "milliliter")
HU: Code = ("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT: Code = ("%", "UCUM", "percent")
NO_UNITS: Code = ("1", "UCUM", "no units")
