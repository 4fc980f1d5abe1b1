"""A SEG and a TID 1500 SR built once on a synthetic two-slice CT when the node starts, so the
first study does not pay for what highdicom loads on its first objects (the standard's IOD and
module tables, read from JSON: about 0.5 s of CPU) — :func:`warm_up`."""

from __future__ import annotations

import logging

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ainode_sdk.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Code,
    Measurement,
    Resources,
    Segment,
    SeriesRequirements,
)
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError

logger = logging.getLogger(__name__)

_TISSUE: Code = ("85756007", "SCT", "Tissue")
_ORGAN: Code = ("113343008", "SCT", "Organ")
_VOLUME: Code = ("118565006", "SCT", "Volume")
_ML: Code = ("ml", "UCUM", "milliliter")


def _slice(number: int) -> Dataset:
    """One 8 x 8 CT slice (1 mm pixels, 1 mm apart along +z), headers only: no patient data."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = derive_uid("ainode-warm-up", "instance", str(number))
    ds.StudyInstanceUID = derive_uid("ainode-warm-up", "study")
    ds.SeriesInstanceUID = derive_uid("ainode-warm-up", "series")
    ds.FrameOfReferenceUID = derive_uid("ainode-warm-up", "frame-of-reference")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "WARM^UP", "WARMUP", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20000101", "", "", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number + 1
    ds.Rows = ds.Columns = 8
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def warm_up(node_ae_title: str) -> None:
    """Build a SEG and an SR of a synthetic two-slice CT and discard them (highdicom's tables
    are then loaded in this process). A failure is logged: the first study then loads them."""
    from node.results import build_results

    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 2:6, 2:6] = True
    result = AlgorithmResult(
        segments=[Segment("Warm-up", mask, _TISSUE, _ORGAN)],
        measurements=[Measurement("Warm-up", _VOLUME, 0.032, _ML)],
    )
    spec = AlgorithmSpec("warm-up", "1", "warm-up", SeriesRequirements(("CT",)), ("SEG", "SR"), Resources(0.1))
    try:
        build_results([_slice(0), _slice(1)], result, spec, lambda kind: derive_uid("ainode-warm-up", kind),
                      node_ae_title)  # fmt: skip
    except ResultBuildError as exc:
        logger.warning("result build warm-up failed: %s", exc)
