"""Comprehensive 3D SR with the TID 1500 Measurement Report, built with highdicom.

One measurement group per measured segment (TID 1411, referencing the segment of the SEG and its
source series) and one group without a region for measurements of several segments together
(TID 1501, e.g. "Both lungs"). Every measurement carries UCUM units and the algorithm (TID 4019).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset

from algorithms.base import AlgorithmResult, AlgorithmSpec
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError
from node.results.seg import coded

CT_CHEST = ("24627-2", "LN", "CT Chest")
LUNG = ("39607008", "SCT", "Lung")


def build_measurement_report(
    segmentation: Dataset,
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device_uid: str,
) -> Dataset:
    """Build the TID 1500 SR for ``result``, referencing ``segmentation``.

    Raises
    ------
    ResultBuildError
        A measurement names a segment that is not in the SEG, or highdicom refuses the content.
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=spec.name,
        version=spec.version,
        parameters=[f"{k}={v}" for k, v in result.parameters.items()] or None,
    )
    segment_numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in segmentation.SegmentSequence}
    segment_types = {s.label: s.property_type for s in result.segments}
    by_label: dict[str, list[hd.sr.Measurement]] = {}
    for m in result.measurements:
        by_label.setdefault(m.segment_label, []).append(
            hd.sr.Measurement(
                name=coded(m.concept),
                value=m.value,
                unit=coded(m.unit),
                derivation=coded(m.derivation) if m.derivation else None,
                algorithm_id=algorithm,
            )
        )
    study_uid = str(segmentation.StudyInstanceUID)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    try:
        for label, measurements in by_label.items():
            tracking = hd.sr.TrackingIdentifier(
                uid=derive_uid(study_uid, spec.name, spec.version, "tracking", label), identifier=label
            )
            if label in segment_numbers:
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
                            segmentation, segment_number=segment_numbers[label]
                        ),
                        finding_type=coded(segment_types[label]),
                        finding_sites=[hd.sr.FindingSite(coded(segment_types[label]))],
                        algorithm_id=algorithm,
                        measurements=measurements,
                    )
                )
            else:
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        finding_type=coded(LUNG),
                        finding_sites=[hd.sr.FindingSite(coded(LUNG))],
                        algorithm_id=algorithm,
                        measurements=measurements,
                    )
                )
        observer = hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name="ainode", model_name=spec.name
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=coded(CT_CHEST),
            imaging_measurements=groups,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[segmentation, *sources],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer="ainode",
            is_complete=True,
            series_description=f"{spec.name} measurements",
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ResultBuildError(f"SR: {exc}") from exc
