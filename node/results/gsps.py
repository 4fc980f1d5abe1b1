"""Grayscale Softcopy Presentation State (PS3.3 A.33.1) that draws a result on the original images.

For viewers that show neither SEG nor SR (many classic PACS viewers do show GSPS): the presentation
state references the source series and carries, per segment, one graphic layer in the segment's
colour (the SEG's) with the outline of each connected part on every slice the segment covers
(parts of at least :data:`~node.results.outline.MIN_PART_PIXELS` pixels, at most
:data:`MAX_PARTS_PER_SLICE` per slice), and a text layer with the measurements of each measured
label on its representative slice. Located findings are drawn as a point or a box in a findings
layer with their label. Graphic data are in image pixel coordinates (PIXEL, PS3.3 C.10.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset

from ainode_sdk.base import AlgorithmResult, AlgorithmSpec
from node.errors import ResultBuildError
from node.results.air import contributing_equipment
from node.results.identity import ObjectIdentity
from node.results.legend import measurement_lines
from node.results.outline import measured_regions, segment_regions
from node.results.seg import cielab, content_label, segment_colour
from node.results.sr import locate_on_image, tracking_uid

MAX_PARTS_PER_SLICE = 32
_TEXT_LINE_PX = 14.0
_WHITE = (255, 255, 255)
_FINDING = (255, 160, 0)


def _layer_name(prefix: str, number: int) -> str:
    return f"{prefix} {number}"[:16]


def build_presentation_state(
    sources: Sequence[Dataset], result: AlgorithmResult, spec: AlgorithmSpec, *, identity: ObjectIdentity
) -> Dataset:
    """Build the GSPS that outlines ``result``'s segments on ``sources``.

    Parameters
    ----------
    sources
        Single-frame source images in the slice order of the masks ``(slices, rows, columns)``.

    Raises
    ------
    ResultBuildError
        Nothing to draw (no segment voxel, no located finding), or highdicom refuses the object.
    """
    study_uid = str(sources[0].StudyInstanceUID)
    layers: list[hd.pr.GraphicLayer] = []
    annotations: list[hd.pr.GraphicAnnotation] = []
    try:
        for region in segment_regions(result):  # one segment at a time
            number = region.segment_numbers[0]
            segment = result.segments[number - 1]
            layer = hd.pr.GraphicLayer(
                layer_name=_layer_name("SEGMENT", number), order=len(layers) + 1,
                description=segment.label[:64], display_color=cielab(segment_colour(segment, number)),
            )  # fmt: skip
            layers.append(layer)
            uid = tracking_uid(study_uid, spec, segment.label)
            for index in range(region.box[0].start, region.box[0].stop):
                objects = [
                    hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=points, units="PIXEL",
                                        tracking_id=segment.label[:64], tracking_uid=uid)
                    for points in region.outlines(index, max_parts=MAX_PARTS_PER_SLICE)
                ]  # fmt: skip
                if objects:
                    annotations.append(
                        hd.pr.GraphicAnnotation(
                            referenced_images=[sources[index]], graphic_layer=layer, graphic_objects=objects
                        )
                    )
        annotations += _measurement_texts(sources, result, layers)
        annotations += _findings(sources, result, layers, spec)
        if not annotations:
            raise ResultBuildError("GSPS: nothing to draw (no segment voxel and no located finding)")
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=list(sources),
            **identity.kwargs(spec),
            content_label=content_label(spec),
            content_description=f"{spec.name} {spec.version} outlines"[:64],
            graphic_annotations=annotations,
            graphic_layers=layers,
            contributing_equipment=contributing_equipment(spec),
            series_description=f"{spec.name} presentation state",
        )
        gsps.Laterality = ""  # General Series, Type 2C: unknown (the source may show a paired organ)
        return gsps
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"GSPS: {exc}") from exc


def _measurement_texts(
    sources: Sequence[Dataset], result: AlgorithmResult, layers: list[hd.pr.GraphicLayer]
) -> list[hd.pr.GraphicAnnotation]:
    """The measurements of each measured label, top left on its representative slice."""
    lines = measurement_lines(result)
    by_slice: dict[int, list[str]] = {}
    for region in measured_regions(result):
        by_slice.setdefault(region.representative_slice(), []).append(region.label)
    if not by_slice:
        return []
    layer = hd.pr.GraphicLayer(layer_name="MEASUREMENTS", order=len(layers) + 1,
                               description="measurements", display_color=cielab(_WHITE))  # fmt: skip
    layers.append(layer)
    out = []
    for index, labels in sorted(by_slice.items()):
        image, texts, top = sources[index], [], 2.0
        width = float(image.Columns) - 4.0
        for label in labels:
            block = [label, *lines.get(label, [])]
            bottom = min(top + _TEXT_LINE_PX * len(block), float(image.Rows) - 1.0)
            text = "\r\n".join(block)[:1024]
            box = (2.0, top, width, bottom)
            texts.append(hd.pr.TextObject(text_value=text, units="PIXEL", bounding_box=box, text_justification="LEFT"))
            top = bottom + 2.0
            if top >= float(image.Rows) - _TEXT_LINE_PX:
                break
        out.append(hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer, text_objects=texts))
    return out


def _findings(
    sources: Sequence[Dataset], result: AlgorithmResult, layers: list[hd.pr.GraphicLayer], spec: AlgorithmSpec
) -> list[hd.pr.GraphicAnnotation]:
    """Located findings: a point or a box, with the finding's label beside it."""
    located = [f for f in result.findings if f.location is not None]
    if not located:
        return []
    layer = hd.pr.GraphicLayer(layer_name="FINDINGS", order=len(layers) + 1, description="findings",
                               display_color=cielab(_FINDING))  # fmt: skip
    layers.append(layer)
    out = []
    for finding in located:
        if finding.location is None:
            continue
        image, graphic_type, data = locate_on_image(sources, finding.location)
        anchor = (float(data[0][0]), float(data[0][1]))
        out.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image], graphic_layer=layer,
                graphic_objects=[hd.pr.GraphicObject(graphic_type=graphic_type, graphic_data=data, units="PIXEL",
                                                     tracking_id=finding.label[:64],
                                                     tracking_uid=tracking_uid(str(image.StudyInstanceUID), spec,
                                                                               finding.label))],
                text_objects=[hd.pr.TextObject(text_value=f"{finding.label}: {finding.value[2]}"[:1024],
                                               units="PIXEL", anchor_point=anchor)],
            )
        )  # fmt: skip
    return out
