"""IHE AI Results (AIR) identification of the algorithm on every result object.

IHE Radiology AIR (Rev. 1.2) asks each result object (SEG, SR, presentation state, secondary
capture) to name the algorithm that produced it in its Contributing Equipment Sequence (0018,A001):
Purpose of Reference (99IHE, 1630, "Processing Algorithm"), the algorithm's manufacturer, model
name (the algorithm's name), software versions (its version) and a Device UID that is the same for
every object one algorithm version produced.
"""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from ainode_sdk.base import AlgorithmSpec
from node.deid.pseudonyms import derive_uid

PROCESSING_ALGORITHM = hd.sr.CodedConcept(value="1630", scheme_designator="99IHE", meaning="Processing Algorithm")


def algorithm_device_uid(spec: AlgorithmSpec) -> str:
    """The Device UID (0018,1002) of one algorithm version (and its weights): deterministic."""
    return derive_uid("ainode-algorithm", spec.name, spec.version, spec.weights_sha256 or "")


def contributing_equipment(spec: AlgorithmSpec) -> list[hd.ContributingEquipment]:
    """The Contributing Equipment Sequence items of a result object of ``spec`` (IHE AIR)."""
    item = hd.ContributingEquipment(  # highdicom knows only CID 7005's purposes: AIR's is set below
        manufacturer=spec.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=spec.name,
        software_versions=spec.version,
        contribution_datetime=datetime.datetime.now(datetime.UTC).replace(microsecond=0),
        contribution_description=f"{spec.name} {spec.version}: {spec.description}"[:1024],
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = algorithm_device_uid(spec)
    return [item]


def has_air_equipment(ds: Dataset, spec: AlgorithmSpec) -> bool:
    """Whether ``ds`` names ``spec`` in its Contributing Equipment Sequence as AIR asks."""
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence", [None])[0]
        if (
            purpose is not None
            and (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("1630", "99IHE")
            and item.get("ManufacturerModelName") == spec.name
            and str(item.get("SoftwareVersions", "")) == spec.version
            and item.get("DeviceUID") == algorithm_device_uid(spec)
        ):
            return True
    return False
