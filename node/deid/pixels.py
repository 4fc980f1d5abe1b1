"""Pixel PHI policy: images that may carry burned-in identifying text never reach an algorithm.

An image is at risk (PS3.15 E.3.1, Clean Pixel Data Option) when Burned In Annotation (0028,0301)
is YES, when its SOP Class is one that commonly carries text in the pixels (Secondary Capture,
ultrasound, video, encapsulated documents), or when its Image Type marks a screen capture. Such an
image is quarantined unless a configured pixel rule blanks the regions that hold the text; then
Burned In Annotation becomes NO and the Clean Pixel Data Option code (113101) is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from node.conditions import evaluate, header_of, keywords_of
from node.settings.config import PixelRule

_AT_RISK_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced Ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "Video Microscopic",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.104.3": "Encapsulated STL",
}
_SCREEN_IMAGE_TYPES = {"SAVE", "SCREEN", "SCREEN SAVE", "SCREENSHOT"}
CLEAN_PIXEL_DATA = ("113101", "DCM", "Clean Pixel Data Option")


def pixel_phi_risk(ds: Dataset) -> str | None:
    """Why the pixels of ``ds`` may hold identifying text, or ``None`` when they are not at risk."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "Burned In Annotation is YES"
    name = _AT_RISK_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if name is not None:
        return f"{name} images may carry burned-in text"
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
    if image_type & _SCREEN_IMAGE_TYPES:
        return "Image Type marks a screen capture"
    return None


def matching_rule(ds: Dataset, rules: Sequence[PixelRule]) -> PixelRule | None:
    """The first pixel rule whose condition holds for ``ds``."""
    for rule in rules:
        if evaluate(rule.match, header_of(ds, keywords_of(rule.match), "", "")).matched:
            return rule
    return None


def blank_regions(ds: Dataset, regions: Sequence[Sequence[int]]) -> None:
    """Set pixels inside each ``[column_start, row_start, column_stop, row_stop]`` to 0 in every frame.

    The pixel data are decoded and stored again uncompressed (Explicit VR Little Endian); colour
    images decoded from YBR are stored as RGB. Burned In Annotation becomes NO.
    """
    pixels = ds.pixel_array.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    view = pixels if frames > 1 else pixels[np.newaxis]
    for c0, r0, c1, r1 in regions:
        view[:, r0:r1, c0:c1, ...] = 0
    photometric = str(ds.PhotometricInterpretation)
    if photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom converts YBR to RGB when decoding
    ds.set_pixel_data(
        pixels, photometric_interpretation=photometric, bits_stored=int(ds.BitsStored), generate_instance_uid=False
    )
    ds.BurnedInAnnotation = "NO"
