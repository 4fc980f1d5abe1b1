"""Comprehensive 3D SR with the TID 1500 Measurement Report, built with highdicom, in two designs.

Everything comes from what the algorithm returns and declares (no anatomy is assumed here). Each
measured label (a segment, or a group such as "Both kidneys" made of ``group_members``) gets one
TID 1411 volumetric group: Tracking Identifier (the label) and Tracking Unique Identifier, finding
type (the segment's property type, or the group's declared site), finding site (anatomic region,
else type, with the type modifier as laterality), the algorithm identification (TID 4019) and the
measurements with UCUM units. The designs differ in how a group gives its region of interest:

``planar`` (the default; what OHIF and other 2D viewers display)
    The region's outlines on its representative slice (the slice where it covers the largest
    area): one closed SCOORD POLYLINE per connected part, each SELECTED FROM that source image.
    OHIF 3.13 needs exactly this in every group: a group without image coordinates (a SEG
    reference, SCOORD3D) stops the whole document from displaying. The volume itself is in the SEG.
``segment``
    A reference to the segment in the SEG and its source series (as dcmqi and 3D Slicer's
    QuantitativeReporting write and read). OHIF 3.13 cannot display such groups.

Qualitative findings get a TID 1410 group with a planar ROI (SCOORD POINT, or a closed POLYLINE for
a box) on the image they lie on; an unlocated finding is a TID 1501 group in the ``segment`` design
and an item of the report's Qualitative Evaluations container (TID 1500 row 12, which 2D viewers
skip safely) in the ``planar`` one. Procedure Reported is the algorithm's, or one for the series'
modality. The evidence is the source images (and the SEG in the ``segment`` design).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ainode_sdk.base import AlgorithmResult, AlgorithmSpec, Code, Finding, Location, Segment
from node.deid.pseudonyms import derive_uid
from node.errors import ResultBuildError
from node.results.air import contributing_equipment
from node.results.identity import ObjectIdentity
from node.results.outline import Region, measured_regions
from node.results.seg import algorithm_parameters, coded

SrDesign = Literal["planar", "segment"]
QUALITATIVE_EVALUATIONS: Code = ("C0034375", "UMLS", "Qualitative Evaluations")
MAX_OUTLINES = 8
"""At most this many outlines (the largest connected parts) per group in the planar design."""
MIN_PART_FRACTION = 0.05
"""Parts smaller than this fraction of the largest one on the slice get no outline in the planar design."""

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


def tracking_uid(study_uid: str, spec: AlgorithmSpec, label: str) -> str:
    """The Tracking Unique Identifier of a measured label or finding: the same in the SR, the GSPS
    and a later analysis of the same study by the same algorithm version."""
    return derive_uid(study_uid, spec.name, spec.version, "tracking", label)


def _site(segment: Segment) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(
        coded(segment.anatomic_region or segment.property_type),
        laterality=coded(segment.type_modifier) if segment.type_modifier else None,
    )


def _outline_regions(region: Region, sources: Sequence[Dataset]) -> list[hd.sr.ImageRegion]:
    """The region's outlines on its representative slice, as SCOORD POLYLINEs on that image: one per
    connected part of at least :data:`MIN_PART_FRACTION` of the largest."""
    index = region.representative_slice()
    parts = region.outlines(index, max_parts=MAX_OUTLINES, min_fraction=MIN_PART_FRACTION)
    parts = parts or region.outlines(index, min_pixels=1)
    source = hd.sr.SourceImageForRegion.from_source_image(sources[index])
    return [hd.sr.ImageRegion(graphic_type="POLYLINE", graphic_data=p, source_image=source) for p in parts]


def _unlocated_container(findings: Sequence[Finding]) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations: one CODE item per finding (its probability, when given,
    a NUM in percent under it)."""
    items = []
    for f in findings:
        item = hd.sr.CodeContentItem(name=coded(f.concept), value=coded(f.value), relationship_type="CONTAINS")
        if f.probability is not None:
            item.ContentSequence = DicomSequence([
                hd.sr.NumContentItem(name=coded(PROBABILITY), value=round(100.0 * f.probability, 2),
                                     unit=coded(PERCENT), relationship_type="HAS PROPERTIES")
            ])  # fmt: skip
        items.append(item)
    container = hd.sr.ContainerContentItem(name=coded(QUALITATIVE_EVALUATIONS), relationship_type="CONTAINS")
    container.ContentSequence = DicomSequence(items)
    return container


def build_measurement_report(
    segmentation: Dataset | None,
    sources: Sequence[Dataset],
    result: AlgorithmResult,
    spec: AlgorithmSpec,
    *,
    design: SrDesign,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device_uid: str,
) -> Dataset:
    """Build the TID 1500 SR for ``result`` in the ``planar`` or the ``segment`` design.

    Parameters
    ----------
    segmentation
        The SEG the ``segment`` design references (``None``: SR-only algorithm, no segment groups).
    sources
        The source images in the slice order of the result's masks ``(slices, rows, columns)``.

    Raises
    ------
    ResultBuildError
        A measurement group has neither a segment nor a declared site, nothing is left to report,
        or highdicom refuses the content.
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
    study_uid = str(sources[0].StudyInstanceUID)
    planar = {r.label: _outline_regions(r, sources) for r in measured_regions(result)} if design == "planar" else {}

    def tracking(label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=tracking_uid(study_uid, spec, label), identifier=label)

    groups: list[_Group] = []
    try:
        for label, measurements in by_label.items():
            declared = result.group_sites.get(label) or (segments[label].property_type if label in segments else None)
            if declared is None:
                raise ResultBuildError(f"measurements of {label!r}: no segment and no declared site")
            site = _site(segments[label]) if label in segments else hd.sr.FindingSite(coded(declared))
            common: dict[str, Any] = dict(
                tracking_identifier=tracking(label), finding_type=coded(declared), finding_sites=[site],
                algorithm_id=algorithm, measurements=measurements,
            )  # fmt: skip
            if design == "planar":
                if label not in planar:  # an empty segment: nothing a viewer could draw
                    continue
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_regions=planar[label], **common)
                )
            elif label in segment_numbers and segmentation is not None:
                groups.append(
                    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                        referenced_segment=_referenced_segment(segmentation, segment_numbers[label]), **common
                    )
                )
            else:
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
        located = [f for f in result.findings if f.location is not None or design == "segment"]
        unlocated = [f for f in result.findings if f.location is None and design == "planar"]
        groups += [_finding_group(f, sources, tracking(f.label), algorithm) for f in located]
        if not groups and not unlocated:
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
            imaging_measurements=groups or None,
        )
        if unlocated:
            report[0].ContentSequence.append(_unlocated_container(unlocated))
        evidence = [segmentation, *sources] if segmentation is not None and design == "segment" else list(sources)
        title = "measurements" if design == "planar" else "measurements (segment references)"
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            **ObjectIdentity(series_instance_uid, sop_instance_uid, series_number).kwargs(),
            is_complete=True,
            series_description=f"{spec.name} {title}",
            contributing_equipment=contributing_equipment(spec),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ResultBuildError(f"SR: {exc}") from exc
