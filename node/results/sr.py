"""Comprehensive 3D SR with the TID 1500 Measurement Report, built with highdicom.

Everything comes from what the algorithm returns and declares (no anatomy is assumed here):

- one TID 1411 group per measured segment, referencing the segment of the SEG and its source series
  (finding type: the segment's property type; finding site: its anatomic region, else its type,
  with its type modifier as laterality);
- one TID 1501 group (no region) per label that is no segment's, e.g. measurements of several
  segments together, typed by the algorithm's ``group_sites``;
- one group per qualitative finding: TID 1410 with a planar ROI (SCOORD POINT, or a closed POLYLINE
  for a box) on the source image it lies on when the finding has a location, TID 1501 otherwise;
  the probability, when given, is a NUM in percent.

Without a SEG (an SR-only algorithm) segment groups are left out and the evidence is the source
images alone. Procedure Reported is the algorithm's, or one for the series' modality. Every
measurement carries UCUM units and the algorithm identification (TID 4019).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from algorithms.base import AlgorithmResult, AlgorithmSpec, Code, Finding, Location
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError
from node.results.seg import algorithm_parameters, coded

PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": ("77477000", "SCT", "Computerized axial tomography"),
    "MR": ("113091000", "SCT", "Magnetic resonance imaging"),
    "PT": ("82918005", "SCT", "Positron emission tomography"),
}
IMAGING_PROCEDURE: Code = ("363679005", "SCT", "Imaging")
PROBABILITY: Code = ("PROB", "99AINODE", "Probability of finding")
PERCENT: Code = ("%", "UCUM", "percent")

_Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def procedure_reported(spec: AlgorithmSpec, sources: Sequence[Dataset]) -> Code:
    """The algorithm's declared procedure, else one for the modality of the source series."""
    if spec.procedure is not None:
        return spec.procedure
    return PROCEDURE_BY_MODALITY.get(str(sources[0].get("Modality", "")), IMAGING_PROCEDURE)


def locate_on_image(sources: Sequence[Dataset], location: Location) -> tuple[Dataset, str, np.ndarray]:
    """The source image a location lies on and its graphic (PS3.3 C.18.6.1.1 image coordinates:
    column, row; the top left corner of the top left pixel is 0.0/0.0).

    Parameters
    ----------
    sources
        Single-frame images of one series (Image Position/Orientation (Patient), Pixel Spacing).
    location
        A point, or a box by two opposite corners, in patient LPS mm.

    Returns
    -------
    tuple
        The image, the graphic type (``POINT`` or a closed ``POLYLINE``) and the ``(n, 2)`` graphic data.

    Raises
    ------
    ResultBuildError
        The location is outside every image of the series.
    """
    points = np.asarray(location.points_lps, dtype=np.float64).reshape(-1, 3)
    centre = points.mean(axis=0)
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    distances = [
        abs(float(normal @ (centre - np.asarray(ds.ImagePositionPatient, dtype=np.float64)))) for ds in sources
    ]
    image = sources[int(np.argmin(distances))]
    origin = np.asarray(image.ImagePositionPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)

    def to_image(p: np.ndarray) -> np.ndarray:
        d = p - origin
        return np.array([d @ row_dir / column_spacing + 0.5, d @ col_dir / row_spacing + 0.5])

    if location.kind == "point":
        graphic_type, data = "POINT", to_image(centre)[None, :]
    else:
        (c0, r0), (c1, r1) = to_image(points[0]), to_image(points[-1])
        graphic_type = "POLYLINE"
        data = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
    columns, rows = float(image.Columns), float(image.Rows)
    if (data < 0).any() or (data[:, 0] > columns).any() or (data[:, 1] > rows).any():
        raise ResultBuildError("a finding's location lies outside the images of the series")
    return image, graphic_type, data


def _finding_group(
    finding: Finding,
    sources: Sequence[Dataset],
    tracking: hd.sr.TrackingIdentifier,
    algorithm: hd.sr.AlgorithmIdentification,
) -> _Group:
    evaluation = hd.sr.QualitativeEvaluation(coded(finding.concept), coded(finding.value))
    measurements = (
        [hd.sr.Measurement(name=coded(PROBABILITY), value=round(100.0 * finding.probability, 2),
                           unit=coded(PERCENT), algorithm_id=algorithm)]
        if finding.probability is not None
        else None
    )  # fmt: skip
    sites = [hd.sr.FindingSite(coded(finding.finding_site))] if finding.finding_site else None
    if finding.location is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=coded(finding.concept), finding_sites=sites,
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[evaluation],
        )  # fmt: skip
    image, graphic_type, data = locate_on_image(sources, finding.location)
    region = hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=coded(finding.concept),
        finding_sites=sites, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[evaluation],
    )  # fmt: skip


def _referenced_segment(segmentation: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The reference to one segment. When the SEG identifies segments per frame, with its frames and
    source images; otherwise (one segment, identified once in the shared functional groups) by
    segment and source series — TID 1411 allows either."""
    per_frame = segmentation.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and "SegmentIdentificationSequence" in per_frame[0]:
        return hd.sr.ReferencedSegment.from_segmentation(segmentation, segment_number=number)
    series = str(segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID), sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=number, source_series=hd.sr.SourceSeriesForSegmentation(series),
    )  # fmt: skip


def build_measurement_report(
    segmentation: Dataset | None,
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device_uid: str,
) -> Dataset:
    """Build the TID 1500 SR for ``result``, referencing ``segmentation`` when there is one.

    Raises
    ------
    ResultBuildError
        A measurement group has neither a segment nor a declared site, or highdicom refuses the content.
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=spec.name,
        version=spec.version,
        parameters=[f"{k}={v}" for k, v in algorithm_parameters(spec, dict(result.parameters)).items()] or None,
    )
    segment_numbers = (
        {str(item.SegmentLabel): int(item.SegmentNumber) for item in segmentation.SegmentSequence}
        if segmentation is not None
        else {}
    )
    segments = {s.label: s for s in result.segments}
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
    study_uid = str((segmentation or sources[0]).StudyInstanceUID)

    def tracking(label: str) -> hd.sr.TrackingIdentifier:
        uid = derive_uid(study_uid, spec.name, spec.version, "tracking", label)
        return hd.sr.TrackingIdentifier(uid=uid, identifier=label)

    groups: list[_Group] = []
    try:
        for label, measurements in by_label.items():
            if label in segment_numbers and segmentation is not None:
                segment = segments[label]
                site = hd.sr.FindingSite(
                    coded(segment.anatomic_region or segment.property_type),
                    laterality=coded(segment.type_modifier) if segment.type_modifier else None,
                )
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking(label),
                        referenced_segment=_referenced_segment(segmentation, segment_numbers[label]),
                        finding_type=coded(segment.property_type),
                        finding_sites=[site],
                        algorithm_id=algorithm,
                        measurements=measurements,
                    )
                )
                continue
            declared = result.group_sites.get(label) or (segments[label].property_type if label in segments else None)
            if declared is None:
                raise ResultBuildError(f"measurements of {label!r}: no segment and no declared site")
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(label),
                    finding_type=coded(declared),
                    finding_sites=[hd.sr.FindingSite(coded(declared))],
                    algorithm_id=algorithm,
                    measurements=measurements,
                )
            )
        groups += [_finding_group(f, sources, tracking(f.label), algorithm) for f in result.findings]
        if not groups:
            raise ResultBuildError("nothing to report: no measurement and no finding")
        observer = hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name="ainode", model_name=spec.name
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=coded(procedure_reported(spec, sources)),
            imaging_measurements=groups,
        )
        evidence = [segmentation, *sources] if segmentation is not None else list(sources)
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
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
