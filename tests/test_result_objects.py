"""Issue 13: every result object (planar SR, segment SR, GSPS, key-image SC, SEG) on the shared chest
CT is valid (dciodvfy), read back by highdicom, geometrically right and names its algorithm (IHE AIR)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ainode_sdk.base import AlgorithmResult, Measurement, Segment, bounding_box
from lung_ct_density import LungCtDensity
from node.jobs.volume import load_volume
from node.results import RESULT_KINDS, build_results, result_kind
from node.results.air import has_air_equipment
from node.results.outline import measured_regions
from node.results.sc import BANNER_PX, PANEL_PX, choose_slices, coronal_plane, render_key_images
from node.results.seg import segment_colour

from .peers import CT_SERIES, dciodvfy, series_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lung() -> dict[str, Any]:
    """The lung-ct-density result on the shared CT and every result object built from it."""
    datasets = [pydicom.dcmread(f) for f in series_files(CT_SERIES)]
    for ds in datasets:
        ds.pop("ReferencedStudySequence", None)  # the node's de-identification removes it
    volume, slices = load_volume(datasets)
    result = LungCtDensity().run(volume, "cpu")
    objects = build_results(
        slices, result, LungCtDensity.spec, lambda kind: pydicom.uid.generate_uid(entropy_srcs=[kind]), "AINODE",
        kinds=RESULT_KINDS, volume=volume,
    )  # fmt: skip
    return {"volume": volume, "slices": slices, "result": result, "objects": objects}


def _by_kind(objects: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in objects:
        out.setdefault(result_kind(ds), []).append(ds)
    return out


def _border_distance(points: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """Distance in pixels from image-coordinate points (column, row) to the border of ``plane``:
    the nearest place between an inside and an outside pixel centre."""
    inside = np.pad(plane, 1)
    edge = inside & ~ndimage.binary_erosion(inside)
    rows, cols = np.nonzero(edge)
    centres = np.column_stack([cols - 1 + 0.5, rows - 1 + 0.5])
    return np.array([np.min(np.hypot(*(centres - p).T)) for p in points]) - 0.5


def test_every_object_is_valid_read_back_and_names_its_algorithm(lung, tmp_path):
    by_kind = _by_kind(lung["objects"])
    assert {k: len(v) for k, v in by_kind.items()} == {"SEG": 1, "SR": 1, "SR-segment": 1, "GSPS": 1, "SC": 4}
    for ds in lung["objects"]:
        path = tmp_path / f"{result_kind(ds)}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _warnings = dciodvfy(path)
        assert errors == [], (result_kind(ds), errors)
        assert has_air_equipment(pydicom.dcmread(path), LungCtDensity.spec), result_kind(ds)
    read = {kind: pydicom.dcmread(next(tmp_path.glob(f"{kind}-*.dcm"))) for kind in ("SEG", "SR", "SR-segment", "GSPS")}
    hd.seg.Segmentation.from_dataset(read["SEG"])
    assert read["GSPS"].GraphicAnnotationSequence  # highdicom 0.28 has no GSPS reader; pydicom reads it
    for sc in tmp_path.glob("SC-*.dcm"):
        image = hd.Image.from_dataset(pydicom.dcmread(sc))
        assert image.get_frame(1).shape[-1] == 3
    expected = {(m.segment_label, m.concept[2]): m.value for m in lung["result"].measurements}
    for kind in ("SR", "SR-segment"):
        report = hd.sr.Comprehensive3DSR.from_dataset(read[kind])
        groups = report.content.get_volumetric_roi_measurement_groups() + report.content.get_image_measurement_groups()
        got = {(str(g.tracking_identifier), m.name.meaning): m.value for g in groups for m in g.get_measurements()}
        assert got == pytest.approx(expected), kind


def test_planar_sr_outlines_each_part_on_the_representative_slice(lung):
    (sr,) = _by_kind(lung["objects"])["SR"]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["Left lung", "Right lung", "Both lungs"]
    slices, shapes = lung["slices"], {r.label: r for r in measured_regions(lung["result"])}
    for group in groups:
        label = str(group.tracking_identifier)
        index = shapes[label].representative_slice()
        plane = shapes[label].axial(index, lung["volume"].voxels.shape[1:])
        outlines = [item for item in group[0].ContentSequence if item.ValueType == "SCOORD"]
        assert len(outlines) == (2 if label == "Both lungs" else 1)  # one per connected part
        for scoord in outlines:
            assert scoord.GraphicType == "POLYLINE"
            assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
                slices[index].SOPInstanceUID
            )
            points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
            assert points[0].tolist() == points[-1].tolist()  # closed
            assert _border_distance(points, plane).max() <= 1.0
        assert group.finding_sites and group.finding_type is not None


def test_gsps_outlines_lie_on_the_segment_borders_of_the_images_they_reference(lung):
    (gsps,) = _by_kind(lung["objects"])["GSPS"]
    result, slices = lung["result"], lung["slices"]
    by_uid = {str(s.SOPInstanceUID): i for i, s in enumerate(slices)}
    layers = {str(item.GraphicLayer): item for item in gsps.GraphicLayerSequence}
    segment_layers = {f"SEGMENT {n}": s for n, s in enumerate(result.segments, start=1)}
    assert set(segment_layers) | {"MEASUREMENTS"} <= set(layers)
    for name, segment in segment_layers.items():
        colour = hd.color.CIELabColor.from_rgb(*segment_colour(segment, int(name.split()[1])))
        assert list(layers[name].GraphicLayerRecommendedDisplayCIELabValue) == list(colour.value)
    checked = 0
    for annotation in gsps.GraphicAnnotationSequence:
        (image,) = annotation.ReferencedImageSequence
        index = by_uid[str(image.ReferencedSOPInstanceUID)]  # references an image of the CT series
        segment = segment_layers.get(str(annotation.GraphicLayer))
        if segment is None:
            continue
        for graphic in annotation.GraphicObjectSequence:
            points = np.asarray(graphic.GraphicData, dtype=float).reshape(-1, 2)
            assert _border_distance(points, segment.mask[index]).max() <= 1.0
            checked += 1
    assert checked > 100
    referenced = {str(i.ReferencedSOPInstanceUID) for i in gsps.ReferencedSeriesSequence[0].ReferencedImageSequence}
    assert referenced == set(by_uid)
    texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    left = next(m for m in result.measurements if m.segment_label == "Left lung")
    assert any("Left lung" in t and f"{left.value:g}" in t for t in texts)


def test_key_images_burn_outlines_on_the_borders_with_banner_and_values(lung):
    result, volume, slices = lung["result"], lung["volume"], lung["slices"]
    scs = _by_kind(lung["objects"])["SC"]
    images = render_key_images(volume, slices, result, LungCtDensity.spec)
    union = np.logical_or.reduce([s.mask for s in result.segments])
    assert [img.sources for img in images[:3]] == [(i,) for i in choose_slices(union)]
    for sc, image in zip(scs, images, strict=True):
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert int(sc.SeriesNumber) > 2 and sc.StudyInstanceUID == slices[0].StudyInstanceUID
        sources = {str(i.ReferencedSOPInstanceUID) for i in sc.SourceImageSequence}
        assert sources == {str(slices[i].SOPInstanceUID) for i in image.sources}
        pixels = sc.pixel_array
        assert np.array_equal(pixels, image.pixels)
        columns = image.image_columns
        banner = pixels[:BANNER_PX, columns : columns + PANEL_PX]
        assert (banner.max(axis=2) > 150).sum() > 200  # banner text drawn
        for number, segment in enumerate(result.segments[:2], start=1):  # the lungs
            colour = np.array(segment_colour(segment, number))
            drawn = np.all(pixels[:, :columns] == colour, axis=2)
            rows, cols = np.nonzero(drawn)
            assert len(rows) > 50
            plane = image.masks[number][: pixels.shape[0], :columns]
            distance = _border_distance(np.column_stack([cols + 0.5, rows + 0.5]), plane)
            assert np.quantile(distance, 0.99) <= 1.0  # drawn pixels lie on the border
    assert images[3].plane == "coronal" and scs[3].PatientOrientation == ["L", "F"]
    row = int(np.argmax(union.sum(axis=(0, 2))))
    left = coronal_plane(result.segments[0].mask, row, volume.spacing_mm)  # the reformat of the whole mask
    assert np.array_equal(images[3].masks[1][: left.shape[0]], left)


def test_another_structure_gets_its_own_labels_colours_and_outlines(lung, tmp_path):
    """Nothing lung-specific: a result with one segment of another structure and its own colour."""
    volume, slices = lung["volume"], lung["slices"]
    kidney = np.zeros(volume.voxels.shape, dtype=bool)
    kidney[20:40, 200:260, 300:350] = True
    segment = Segment(
        "Left kidney", kidney, ("123037004", "SCT", "Anatomical Structure"), ("64033007", "SCT", "Kidney"),
        type_modifier=("7771000", "SCT", "Left"), colour=(200, 90, 40),
    )  # fmt: skip
    volume_ml = Measurement("Left kidney", ("118565006", "SCT", "Volume"), 42.0, ("ml", "UCUM", "milliliter"))
    result = AlgorithmResult(segments=[segment], measurements=[volume_ml])
    objects = build_results(slices, result, LungCtDensity.spec, lambda k: pydicom.uid.generate_uid(), "AINODE",
                            kinds=RESULT_KINDS, volume=volume)  # fmt: skip
    by_kind = _by_kind(objects)
    (sr,) = by_kind["SR"]
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    assert str(group.tracking_identifier) == "Left kidney"
    (scoord,) = [i for i in group[0].ContentSequence if i.ValueType == "SCOORD"]
    points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
    assert points[:, 0].min() == pytest.approx(300) and points[:, 0].max() == pytest.approx(350)  # on its border
    (gsps,) = by_kind["GSPS"]
    assert str(gsps.GraphicLayerSequence[0].GraphicLayerDescription) == "Left kidney"
    first = by_kind["SC"][0].pixel_array
    assert np.all(first == np.array([200, 90, 40]), axis=2).sum() > 50
    for ds in objects:
        path = Path(tmp_path) / f"{result_kind(ds)}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy(path)[0] == [], result_kind(ds)


def test_a_label_map_result_gives_the_same_objects_as_its_masks(lung):
    """A model's label map (one byte per voxel, empty masks) is outlined exactly as masks would be."""
    volume, slices = lung["volume"], lung["slices"]
    masks = [s.mask for s in lung["result"].segments[:2]]  # the lungs: no overlap
    label_map = np.zeros(volume.voxels.shape, dtype=np.uint16)
    for number, mask in enumerate(masks, start=1):
        label_map[mask] = number
    as_masks = lung["result"]
    as_map = AlgorithmResult(
        segments=[dataclasses.replace(s, mask=np.empty(0, dtype=bool)) for s in as_masks.segments[:2]],
        measurements=as_masks.measurements, group_sites=as_masks.group_sites,
        group_members=as_masks.group_members, label_map=label_map,
    )  # fmt: skip
    two = dataclasses.replace(as_masks, segments=as_masks.segments[:2])

    def objects(result: AlgorithmResult) -> dict[str, list[pydicom.Dataset]]:
        uid = lambda kind: pydicom.uid.generate_uid(entropy_srcs=[kind])  # noqa: E731
        built = build_results(slices, result, LungCtDensity.spec, uid, "AINODE",
                              kinds=("SR", "GSPS", "SC"), volume=volume)  # fmt: skip
        return _by_kind(built)

    mine, theirs = objects(as_map), objects(two)
    for kind in ("SR", "GSPS"):
        graphics = [
            [list(e.value) for e in ds.iterall() if e.keyword == "GraphicData"]
            for ds in (mine[kind][0], theirs[kind][0])
        ]
        assert graphics[0] == graphics[1] and graphics[0], kind
    for a, b in zip(mine["SC"], theirs["SC"], strict=True):
        assert np.array_equal(a.pixel_array, b.pixel_array)


def test_segments_overlap_is_declared_from_the_masks(lung):
    """The SEG's Segments Overlap (checked a few frames at a time, not by highdicom's int64 sum):
    YES where a segment lies inside another (low attenuation area in the lungs), NO for the lungs."""
    (seg,) = _by_kind(lung["objects"])["SEG"]
    assert seg.SegmentsOverlap == "YES"
    two = dataclasses.replace(lung["result"], segments=lung["result"].segments[:2])
    uid = lambda kind: pydicom.uid.generate_uid(entropy_srcs=[kind, "two"])  # noqa: E731
    (lungs,) = build_results(lung["slices"], two, LungCtDensity.spec, uid, "AINODE", kinds=("SEG",))
    assert lungs.SegmentsOverlap == "NO"
    read = hd.seg.Segmentation.from_dataset(lungs)
    for number, segment in enumerate(two.segments, start=1):  # the frames hold the masks
        volume = read.get_volume(segment_numbers=[number], combine_segments=True).array
        assert (volume > 0).sum() == segment.mask.sum()


@pytest.mark.parametrize("shape", [(7,), (5, 9), (6, 11, 13), (3, 4, 5, 6)])
def test_bounding_box_is_find_objects_box(shape):
    """The SDK's bounding box (used for every segment's outline region and by lung-ct-density)
    is the box :func:`scipy.ndimage.find_objects` gives, for sparse, dense, empty and strided masks."""
    rng = np.random.default_rng(7)
    for density in (0.0, 0.002, 0.05, 0.6):
        mask = rng.random(shape) < density
        for view in (mask, mask[..., ::2], np.asfortranarray(mask)):
            expected = (ndimage.find_objects(view.astype(np.uint8)) or [None])[0]
            assert bounding_box(view) == expected, (shape, density)
    single = np.zeros(shape, dtype=bool)
    corner = tuple(n - 1 for n in shape)
    single[corner] = True
    assert bounding_box(single) == tuple(slice(i, i + 1) for i in corner)
    with pytest.raises(ValueError):
        bounding_box(np.bool_(True))
