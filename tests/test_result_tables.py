"""Issue 26: the result build's shortcuts give what the plain code gives — highdicom's IOD
look-ups memoised (``node.results.standard``), bit-packed masks unpacked a slab at a time
into their block (``node.jobs.isolation``), and a job's summary of its segments read from the
packed masks a slab at a time (``node.monitoring.describe``)."""

from __future__ import annotations

import dataclasses

import highdicom._standard_utils as standard_utils
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, SegmentationStorage

import node.results  # noqa: F401  (installs the memo)
from ainode_sdk.base import AlgorithmResult, Segment, Volume
from node.jobs import isolation
from node.jobs.isolation import pack_result, packed_masks, unpack_result
from node.jobs.volume import load_volume
from node.monitoring import describe
from node.results import build_results
from node.results.standard import memoise_iod_lookups

from .peers import CT_SERIES, series_files

_TISSUE = ("85756007", "SCT", "Tissue")
_ORGAN = ("113343008", "SCT", "Organ")


def test_iod_lookups_answer_as_highdicom_and_are_kept():
    memoised = standard_utils.is_attribute_in_iod
    plain = memoised.__wrapped__  # highdicom's own, kept by the memo
    assert plain.__module__ == "highdicom._standard_utils" and plain is not memoised
    memoise_iod_lookups()  # a second install keeps the one memo
    assert standard_utils.is_attribute_in_iod is memoised
    questions = [
        ("PerFrameFunctionalGroupsSequence", CTImageStorage, None),
        ("PerFrameFunctionalGroupsSequence", SegmentationStorage, None),
        ("ContentDate", CTImageStorage, None),
        ("PixelData", SegmentationStorage, ["IconImageSequence"]),
        ("PixelData", "1.2.840.10008.5.1.4.1.1.88.34", ["IconImageSequence"]),  # Comprehensive 3D SR
        ("FloatPixelData", CTImageStorage, ("IconImageSequence",)),
        ("NoSuchKeyword", CTImageStorage, None),
    ]
    for attribute, sop_class, exclude in questions:
        for _ in range(2):  # the second answer comes from the memo
            assert memoised(attribute, sop_class, exclude) == plain(attribute, sop_class, exclude), attribute
    seg = pydicom.Dataset()
    seg.SOPClassUID = SegmentationStorage
    assert standard_utils.is_multiframe_image(seg)  # highdicom's own caller, through the memo
    hits = memoised.cache_info().hits
    with pytest.raises(KeyError, match="No IOD found"):  # an unknown SOP class: highdicom's error, every time
        memoised("PixelData", "1.2.3.4")
    with pytest.raises(KeyError, match="No IOD found"):
        memoised("PixelData", "1.2.3.4")
    assert memoised.cache_info().hits == hits


def test_a_seg_build_asks_the_memo_not_the_tables():
    datasets = [pydicom.dcmread(f, stop_before_pixels=False) for f in series_files(CT_SERIES)]
    volume, slices = load_volume(datasets)
    mask = np.zeros(volume.voxels.shape, dtype=bool)
    mask[10:20, 200:300, 200:300] = True
    result = AlgorithmResult(segments=[Segment("Block", mask, _TISSUE, _ORGAN)], measurements=[])
    from lung_ct_density import LungCtDensity

    spec = dataclasses.replace(LungCtDensity.spec, outputs=("SEG",))
    before = standard_utils.is_attribute_in_iod.cache_info()
    (seg,) = build_results(
        slices, result, spec, lambda kind: pydicom.uid.generate_uid(entropy_srcs=[kind]), "AINODE", kinds=("SEG",)
    )
    after = standard_utils.is_attribute_in_iod.cache_info()
    assert seg.NumberOfFrames == 10
    # one question per source image at least, all but a handful answered from the memo
    assert after.hits - before.hits >= len(slices)
    assert after.misses - before.misses <= 4


@pytest.mark.parametrize("shape", [(3, 5, 7), (64, 33, 17), (2, 1024, 1025), (1, 1, 1)])
def test_masks_unpack_in_slabs_to_the_same_voxels(monkeypatch, shape):
    monkeypatch.setattr(isolation, "_UNPACK_BYTES", 100)  # many slabs, the last one partial
    rng = np.random.default_rng(7)
    masks = [rng.random(shape) < p for p in (0.01, 0.5, 0.99)]
    segments = [Segment(f"S{i}", m, _TISSUE, _ORGAN) for i, m in enumerate(masks)]
    unpacked = unpack_result(pack_result(AlgorithmResult(segments=segments, measurements=[])))
    for segment, mask in zip(unpacked.segments, masks, strict=True):
        assert segment.mask.shape == mask.shape and segment.mask.dtype == np.bool_
        assert np.array_equal(segment.mask, mask)
    base = unpacked.segments[0].mask.base  # still views of one segment-major block
    assert all(s.mask.base is base for s in unpacked.segments)


@pytest.mark.parametrize("shape", [(3, 5, 7), (40, 33, 17), (2, 1024, 1025), (1, 1, 1)])
def test_packed_masks_read_a_slab_at_a_time_give_the_masks_voxels_and_summary(monkeypatch, shape):
    monkeypatch.setattr(isolation, "_UNPACK_BYTES", 100)  # the count over many chunks, the last one partial
    monkeypatch.setattr(describe, "MAX_SAMPLES", 50)  # the sampling's stride taken over slab borders
    rng = np.random.default_rng(11)
    masks = [rng.random(shape) < p for p in (0.0, 0.01, 0.5, 0.99)]  # an empty one too
    segments = [Segment(f"S{i}", m, _TISSUE, _ORGAN) for i, m in enumerate(masks)]
    packed = pack_result(AlgorithmResult(segments=segments, measurements=[]))
    lazy = list(packed_masks(packed))
    for mask, reader in zip(masks, lazy, strict=True):
        assert reader.shape == mask.shape and reader.count() == int(np.count_nonzero(mask))
        for first, stop in ((0, 1), (1, 4), (0, shape[0]), (shape[0] - 1, shape[0] + 16)):
            slab = reader.slab(first, stop)
            assert slab.dtype == np.bool_ and np.array_equal(slab, mask[first:stop])
    voxels = rng.normal(-500.0, 300.0, shape).astype(np.float32)
    volume = Volume(voxels, (1.0, 0.7, 0.7), np.diag([0.7, 0.7, 1.0, 1.0]), "CT")
    result = AlgorithmResult(segments=segments, measurements=[])
    assert describe.describe_outputs(result, volume, packed_masks(packed)) == describe.describe_outputs(result, volume)


@pytest.mark.parametrize("threads", [1, 3])
def test_segment_summaries_are_the_voxels_under_each_mask_from_masks_or_a_label_map(monkeypatch, threads):
    monkeypatch.setattr(describe, "MAX_SAMPLES", 500)  # a stride over the larger segments
    shape = (37, 29, 31)  # slabs of 16 slices: the last one partial
    rng = np.random.default_rng(5)
    labels = rng.choice(4, size=shape, p=[0.5, 0.3, 0.19, 0.01]).astype(np.uint16)
    labels[labels == 3] = 0  # label 3 left empty
    voxels = rng.normal(-500.0, 300.0, shape).astype(np.float32)
    volume = Volume(voxels, (1.0, 0.7, 0.7), np.diag([0.7, 0.7, 1.0, 1.0]), "CT")
    masks = [labels == n for n in (1, 2, 3)]
    expected = {}
    for n, mask in enumerate(masks, 1):  # straight from the definition: voxels[mask][::stride]
        size = int(mask.sum())
        stats: dict[str, float] = {"voxels": size, "volume_ml": round(size * volume.voxel_volume_ml, 3)}
        if size:
            sample = voxels[mask][:: size // 500 + 1]
            stats["mean"] = round(float(sample.mean()), 2)
            for q in (5, 50, 95):
                stats[f"p{q:02d}"] = round(float(np.percentile(sample, q)), 2)
        expected[f"S{n}"] = stats
    assert expected["S3"] == {"voxels": 0, "volume_ml": 0.0}
    with_masks = AlgorithmResult([Segment(f"S{n}", m, _TISSUE, _ORGAN) for n, m in enumerate(masks, 1)], [])
    empty = np.zeros((0, 0, 0), dtype=bool)
    with_labels = AlgorithmResult([Segment(f"S{n}", empty, _TISSUE, _ORGAN) for n in (1, 2, 3)], [], label_map=labels)
    packed = pack_result(with_masks)
    for summary in (
        describe.describe_outputs(with_masks, volume, threads=threads),
        describe.describe_outputs(with_masks, volume, packed_masks(packed), threads=threads),
        describe.describe_outputs(with_labels, volume, threads=threads),
    ):
        assert summary["segments"] == expected
