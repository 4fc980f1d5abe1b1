"""Volume loading and the lung-ct-density algorithm on real CT."""

from __future__ import annotations

import copy
import random

import numpy as np
import pydicom
import pytest

from ainode_sdk.base import Algorithm, Volume
from ainode_sdk.errors import PluginLoadError, SeriesRefused
from ainode_sdk.registry import Registry
from lung_ct_density import LungCtDensity
from node.jobs.volume import load_volume

from .peers import CT_SERIES, MR_SERIES, TRANSCODED, series_files


@pytest.fixture(scope="module")
def ct_datasets() -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in series_files(CT_SERIES)]


@pytest.fixture(scope="module")
def ct_volume(ct_datasets) -> Volume:
    return load_volume(ct_datasets)[0]


@pytest.fixture(scope="module")
def result(ct_volume):
    return LungCtDensity().run(ct_volume, "cpu")


def test_volume_geometry(ct_volume, ct_datasets):
    assert ct_volume.voxels.shape == (64, 512, 512)
    assert ct_volume.voxels.dtype == np.float32
    assert ct_volume.spacing_mm == pytest.approx((5.0, 0.841796875, 0.841796875))
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in ct_datasets)
    corner = ct_volume.index_to_lps(np.array([[0, 0, 0], [63, 0, 0], [0, 10, 20]]))
    assert corner[0][2] == pytest.approx(z[0]) and corner[1][2] == pytest.approx(z[-1])
    first = min(ct_datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert corner[2][:2] == pytest.approx(
        [
            float(first.ImagePositionPatient[0]) + 20 * 0.841796875,
            float(first.ImagePositionPatient[1]) + 10 * 0.841796875,
        ]
    )
    assert ct_volume.voxels.min() >= -1024  # HU after the Modality LUT


def test_slice_order_does_not_depend_on_file_order(ct_datasets, ct_volume):
    shuffled = list(ct_datasets)
    random.Random(7).shuffle(shuffled)
    again, _ = load_volume(shuffled)
    assert np.array_equal(again.voxels, ct_volume.voxels)


def test_transfer_syntaxes_decode_identically():
    reference = [pydicom.dcmread(p).pixel_array for p in series_files(TRANSCODED / "explicit_le")]
    folders = [p for p in sorted(TRANSCODED.iterdir()) if p.is_dir()]
    assert len(folders) >= 7
    for folder in folders:
        pixels = [pydicom.dcmread(p).pixel_array for p in series_files(folder)]
        for a, b in zip(reference, pixels, strict=True):
            assert np.array_equal(a, b), folder.name


def test_measurements_are_plausible(result):
    values = {(m.segment_label, m.concept[2]): m for m in result.measurements}
    for lung in ("Left lung", "Right lung"):
        assert 500 <= values[(lung, "Volume")].value <= 5000
        assert -950 <= values[(lung, "Attenuation Coefficient")].value <= -700
        assert 0 <= values[(lung, "Percent lung volume at or below -950 HU")].value <= 100
        assert -1024 <= values[(lung, "15th percentile of lung density")].value <= -800
    total = values[("Both lungs", "Volume")].value
    assert total == pytest.approx(
        values[("Left lung", "Volume")].value + values[("Right lung", "Volume")].value, abs=0.2
    )
    assert values[("Left lung", "Volume")].unit == ("ml", "UCUM", "milliliter")


def test_left_lung_is_patient_left_in_lps(result, ct_volume):
    masks = {s.label: s.mask for s in result.segments}
    left = ct_volume.index_to_lps(np.argwhere(masks["Left lung"]).mean(axis=0))[0]
    right = ct_volume.index_to_lps(np.argwhere(masks["Right lung"]).mean(axis=0))[0]
    assert left[0] > right[0] + 50  # LPS +x is the patient's left
    assert not (masks["Left lung"] & masks["Right lung"]).any()
    laa = masks["Low attenuation area"]
    assert not (laa & ~(masks["Left lung"] | masks["Right lung"])).any()


def test_left_right_follow_patient_not_array_when_image_is_flipped(ct_volume):
    """Mirror the columns and the affine together: the patient is the same, so labels must not swap."""
    affine = ct_volume.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (ct_volume.voxels.shape[2] - 1)
    affine[:3, 2] *= -1
    flipped = Volume(
        np.ascontiguousarray(ct_volume.voxels[:, :, ::-1]),
        ct_volume.spacing_mm,
        affine,
        "CT",
        ct_volume.slice_thickness_mm,
    )
    out = LungCtDensity().run(flipped, "cpu")
    masks = {s.label: s.mask for s in out.segments}
    assert (
        flipped.index_to_lps(np.argwhere(masks["Left lung"]).mean(axis=0))[0][0]
        > 0
        > flipped.index_to_lps(np.argwhere(masks["Right lung"]).mean(axis=0))[0][0]
    )


def _volume_like(ct_volume: Volume, **changes: object) -> Volume:
    fields = {
        "voxels": ct_volume.voxels,
        "spacing_mm": ct_volume.spacing_mm,
        "affine": ct_volume.affine,
        "modality": ct_volume.modality,
        "slice_thickness_mm": ct_volume.slice_thickness_mm,
    }
    fields.update(changes)
    return Volume(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modality": "MR"}, "modality 'MR'"),
        ({"slice_thickness_mm": 7.5}, "thicker than 5 mm"),
        ({"spacing_mm": (10.0, 0.84, 0.84)}, "thicker than 5 mm"),
        ("few", "at least 20"),
        ("no-lungs", "no air-filled region|no lung"),
    ],
)
def test_refuses_series_it_cannot_measure(ct_volume, changes, reason):
    if changes == "few":
        volume = _volume_like(ct_volume, voxels=ct_volume.voxels[:10])
    elif changes == "no-lungs":
        volume = _volume_like(ct_volume, voxels=np.full_like(ct_volume.voxels, 40.0))  # soft tissue everywhere
    else:
        volume = _volume_like(ct_volume, **changes)
    with pytest.raises(SeriesRefused, match=reason):
        LungCtDensity().run(volume, "cpu")


def test_mr_series_loads_but_is_refused():
    datasets = [pydicom.dcmread(p) for p in sorted(MR_SERIES.iterdir()) if p.is_file()]
    volume, _ = load_volume(datasets)
    with pytest.raises(SeriesRefused, match="MR"):
        LungCtDensity().run(volume, "cpu")


def test_duplicate_positions_are_refused(ct_datasets):
    twin = copy.deepcopy(ct_datasets[0])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(SeriesRefused, match="share one slice position"):
        load_volume([*ct_datasets, twin])


def test_registry_finds_plugin_by_entry_point():
    registry = Registry()
    assert "lung-ct-density" in registry.names()
    algorithm = registry.get("lung-ct-density")
    assert isinstance(algorithm, Algorithm)
    assert algorithm.spec.outputs == ("SEG", "SR")
    with pytest.raises(PluginLoadError, match="no algorithm named"):
        registry.get("nope")


@pytest.mark.gpu
def test_cuda_matches_cpu(ct_volume, result):
    gpu = LungCtDensity().run(ct_volume, "cuda")
    cpu = {(m.segment_label, m.concept[2]): m.value for m in result.measurements}
    assert {(m.segment_label, m.concept[2]): m.value for m in gpu.measurements} == pytest.approx(cpu, rel=1e-4)


def test_parameters_change_the_measurement(ct_volume, result):
    from lung_ct_density import LungCtDensityParams

    laxer = LungCtDensity().run(ct_volume, "cpu", LungCtDensityParams(laa_threshold_hu=-900))
    default = {(m.segment_label, m.concept[2]): m.value for m in result.measurements}
    changed = {(m.segment_label, m.concept[2]): m.value for m in laxer.measurements}
    at_900 = changed[("Both lungs", "Percent lung volume at or below -900 HU")]
    assert at_900 > default[("Both lungs", "Percent lung volume at or below -950 HU")]
    assert laxer.parameters["laa_threshold_hu"] == "-900"
    assert {s.property_type[0] for s in laxer.segments} >= {"LAA900"}


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_two_slab_labelling_finds_the_components_of_one_pass(density):
    """The labelling in two threads joins components across the seam exactly: the same partition
    of the voxels as cc3d's single pass (only the numbering may differ), the same sizes, and the
    mask of one component, of all but one, or of many is theirs."""
    import cc3d

    from lung_ct_density.segment import _Components

    mask = np.random.default_rng(7).random((96, 40, 48)) < density
    components = _Components.of(mask)
    theirs, m = cc3d.connected_components(mask, connectivity=6, return_N=True)
    n = components.n
    assert len(components.slabs) == 2 and n == m and n > 10
    mine = components.numbers(mask)
    assert set(np.unique(mine)) == set(range(1, n + 1))
    pairs = np.unique(np.stack([mine, theirs[mask].astype(np.int64)]), axis=1)
    assert pairs.shape[1] == n  # one of theirs for each of mine: a bijection
    assert sorted(components.sizes()) == sorted(np.bincount(theirs[mask])[1:])
    largest = int(np.argmax(components.sizes())) + 1
    (same,) = pairs[1][pairs[0] == largest]
    assert np.array_equal(components.select(np.arange(n + 1) == largest), theirs == same)
    all_but = np.arange(n + 1) != largest  # a few left out: selected by comparisons
    all_but[0] = False
    assert np.array_equal(components.select(all_but), (theirs != 0) & (theirs != same))
    half = np.random.default_rng(1).random(n + 1) < 0.5  # many of each: by table lookup
    half[0] = False
    mine_to_theirs = dict(zip(pairs[0], pairs[1], strict=True))
    chosen_theirs = np.zeros(m + 1, dtype=bool)
    chosen_theirs[[mine_to_theirs[i] for i in np.flatnonzero(half)]] = True
    assert np.array_equal(components.select(half), chosen_theirs[theirs])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 4), (40, 33, 21)])
def test_six_connected_steps_are_scipys(shape):
    """The 6-connected dilation and erosion by shifted copies give SciPy's voxels (cross
    structure; erosion with SciPy's border of 0), borders included, a slice's holes are filled as
    SciPy fills them, and a centroid from marginals is the mean voxel index."""
    from scipy import ndimage

    from lung_ct_density.segment import _centroid, _dilate6, _erode6, _fill_holes_2d

    cross = ndimage.generate_binary_structure(3, 1)
    for density in (0.2, 0.5, 0.9):
        mask = np.random.default_rng(3).random(shape) < density
        assert np.array_equal(_dilate6(mask), ndimage.binary_dilation(mask, structure=cross))
        assert np.array_equal(_erode6(mask), ndimage.binary_erosion(mask, structure=cross))
        if mask.any():
            assert np.allclose(_centroid(mask), np.argwhere(mask).mean(axis=0), rtol=0, atol=1e-9)
        for plane in mask:  # holes filled per slice as SciPy fills them
            assert np.array_equal(_fill_holes_2d(plane), ndimage.binary_fill_holes(plane))
