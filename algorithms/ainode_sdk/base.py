"""Plain data types shared by every analysis algorithm.

An algorithm receives a :class:`Volume` (a de-identified image series as a voxel array in a known
patient geometry) and returns an :class:`AlgorithmResult` (binary masks and measurements). It never
receives a DICOM dataset, a patient identifier or a network handle: the node builds the DICOM SEG and
the TID 1500 SR from what is returned here.

Codes are plain ``(value, coding scheme designator, meaning)`` tuples so that algorithms do not depend
on highdicom; ``node.results`` turns them into coded concepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from ainode_sdk.errors import SeriesRefused

Code = tuple[str, str, str]
"""A coded concept as ``(CodeValue, CodingSchemeDesignator, CodeMeaning)`` (PS3.3 8.8)."""

RGB = tuple[int, int, int]
"""A display colour as sRGB ``(red, green, blue)``, 0-255 each."""

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Volume:
    """A single image series as a 3D voxel array in patient coordinates.

    Attributes
    ----------
    voxels
        ``float32`` array of shape ``(slices, rows, columns)``. For CT the values are Hounsfield
        units (rescale slope and intercept already applied). Slices are ordered by increasing
        position along the slice normal (row cosine x column cosine), so for an axial acquisition
        index 0 is the most inferior slice.
    spacing_mm
        Voxel spacing ``(slice, row, column)`` in mm; slice spacing is measured between Image
        Position (Patient) values, not taken from Slice Thickness.
    affine
        ``4 x 4`` matrix mapping a homogeneous index ``(slice, row, column, 1)`` to patient
        coordinates (LPS, mm): +x towards the patient's left, +y posterior, +z superior.
    modality
        Modality (0008,0060) of the series, e.g. ``"CT"``.
    slice_thickness_mm
        Slice Thickness (0018,0050) in mm, or ``None`` when the series does not state it.
    """

    voxels: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    modality: str
    slice_thickness_mm: float | None = None
    priors: tuple[Prior, ...] = ()
    """Earlier studies of the same patient, most recent first, when the route asks for them
    (``priors:``); empty otherwise."""

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (1 ml = 1000 mm^3)."""
        s, r, c = self.spacing_mm
        return s * r * c / 1000.0

    def index_to_lps(self, index: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Map voxel indices ``(N, 3)`` as ``(slice, row, column)`` to patient LPS mm ``(N, 3)``."""
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        homogeneous = np.concatenate([idx, np.ones((idx.shape[0], 1))], axis=1)
        return (homogeneous @ self.affine.T)[:, :3]


@dataclass(frozen=True)
class Prior:
    """An earlier study of the same patient, de-identified like the current one (the same patient
    pseudonym and date offset): its series as a :class:`Volume` and how many days before the
    current study it was made. No date itself reaches an algorithm, only the interval.

    Attributes
    ----------
    volume
        The prior's series (same conventions: HU for CT, ``(slices, rows, columns)``, LPS).
    interval_days
        Days from the prior's Study Date to the current study's (positive: earlier).
    """

    volume: Volume
    interval_days: float


@dataclass(frozen=True)
class Segment:
    """One binary segment of a result.

    Attributes
    ----------
    label
        Short human-readable label shown in viewers, e.g. ``"Left lung"``.
    mask
        ``bool`` array with the shape of :attr:`Volume.voxels`, ``(slices, rows, columns)``.
    category
        Segmented Property Category code (CID 7150), e.g. SCT 123037004 "Anatomical Structure".
    property_type
        Segmented Property Type code (CID 7151 / 7166), e.g. SCT 44029006 "Left lung".
    type_modifier
        Segmented Property Type Modifier (e.g. SCT 7771000 "Left" for "Kidney"), or ``None``.
    anatomic_region
        Anatomic Region of a finding that is not itself anatomy (e.g. the lung of a nodule), or ``None``.
    colour
        Recommended display colour (sRGB), or ``None`` for the node's palette.
    """

    label: str
    mask: npt.NDArray[np.bool_]
    category: Code
    property_type: Code
    type_modifier: Code | None = None
    anatomic_region: Code | None = None
    colour: RGB | None = None


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement of one segment, reported in a TID 1500 measurement group.

    Attributes
    ----------
    segment_label
        Label of the :class:`Segment` the measurement was made on.
    concept
        Concept name code of the quantity (e.g. SCT 118565006 "Volume").
    value
        The value, in ``unit``.
    unit
        UCUM unit as ``(code, "UCUM", meaning)``, e.g. ``("ml", "UCUM", "milliliter")``.
    derivation
        Optional derivation code (CID 7464), e.g. SCT 373098007 "Mean".
    """

    segment_label: str
    concept: Code
    value: float
    unit: Code
    derivation: Code | None = None


@dataclass(frozen=True)
class Location:
    """Where a finding lies, in patient coordinates (LPS, mm).

    Attributes
    ----------
    kind
        ``"point"``: one point; ``"box"``: an axis-aligned box given by two opposite corners.
    points_lps
        ``((x, y, z),)`` for a point, ``((x0, y0, z0), (x1, y1, z1))`` for a box.
    """

    kind: Literal["point", "box"]
    points_lps: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Finding:
    """A qualitative finding (e.g. "Nodule": "Present", probability 0.87), optionally located.

    Attributes
    ----------
    label
        Tracking label shown in viewers, e.g. ``"Nodule 1"``.
    concept
        What was evaluated (the finding type), e.g. SCT 27925004 "Nodule".
    value
        The coded answer, e.g. SCT 52101004 "Present".
    probability
        The algorithm's probability of ``value``, 0-1, or ``None``.
    location
        A point or box in patient LPS mm (written as a planar ROI on the image it lies on), or ``None``.
    finding_site
        Anatomic location, or ``None``.
    """

    label: str
    concept: Code
    value: Code
    probability: float | None = None
    location: Location | None = None
    finding_site: Code | None = None


@dataclass(frozen=True)
class AlgorithmResult:
    """What an algorithm returns: segments, the measurements made on them, and qualitative findings.

    ``group_sites`` gives the finding type/site of measurement groups whose label is no segment's
    (measurements of several segments together, such as "Both lungs"); ``group_members`` names the
    segments such a group is made of (where viewers draw it; every segment when not given).

    ``label_map``, when given, holds the segments instead of their masks: a ``uint16`` array of the
    volume's shape ``(slices, rows, columns)`` where value ``i`` is ``segments[i - 1]`` (0: none),
    for models with many non-overlapping labels; their ``mask`` is then empty (memory: one label
    map instead of one mask per segment)."""

    segments: Sequence[Segment]
    measurements: Sequence[Measurement]
    parameters: dict[str, str] = field(default_factory=dict)
    findings: Sequence[Finding] = ()
    group_sites: dict[str, Code] = field(default_factory=dict)
    group_members: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label_map: npt.NDArray[np.uint16] | None = None


@dataclass(frozen=True)
class SeriesRequirements:
    """The kind of series an algorithm accepts; the node checks these before running it."""

    modalities: tuple[str, ...]
    min_slices: int = 1
    max_slice_thickness_mm: float | None = None


@dataclass(frozen=True)
class Resources:
    """What one run needs: peak host memory in GiB and whether a GPU helps or is required."""

    memory_gib: float
    gpu: Literal["none", "optional", "required"] = "optional"


@dataclass(frozen=True)
class AlgorithmSpec:
    """The declaration every plugin makes (name, version, accepted series, outputs, resources).

    ``procedure`` is the Procedure Reported of its SR (e.g. LN 24627-2 "CT Chest"); ``None`` takes it
    from the series' modality. ``weights_sha256`` identifies trained weights in the results'
    algorithm identification and their UIDs. ``manufacturer`` is who made the algorithm (the IHE AIR
    Contributing Equipment of every result object)."""

    name: str
    version: str
    description: str
    accepts: SeriesRequirements
    outputs: tuple[Literal["SEG", "SR"], ...]
    resources: Resources
    procedure: Code | None = None
    weights_sha256: str | None = None
    manufacturer: str = "ainode"


class NoParams(BaseModel):
    """The parameters of an algorithm that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class Algorithm(Protocol):
    """An analysis plugin. Raise :class:`ainode_sdk.errors.SeriesRefused` for series it cannot measure.

    ``Params`` is a pydantic model (``extra="forbid"``) of the parameters a route may set; the node
    validates a route's parameters against it when the configuration is loaded.
    """

    spec: AlgorithmSpec
    Params: type[BaseModel]

    def run(self, volume: Volume, device: Device, params: Any = None) -> AlgorithmResult:
        """Analyse ``volume`` on ``device`` with ``params`` (an instance of ``Params``, or ``None``
        for the defaults) and return masks and measurements."""
        ...


def bounding_box(mask: npt.ArrayLike) -> tuple[slice, ...] | None:
    """The smallest box holding every true voxel of ``mask``, or ``None`` when it has none.

    Parameters
    ----------
    mask
        A boolean array of any number of axes, e.g. ``(slices, rows, columns)``.

    Returns
    -------
    tuple of slice or None
        One ``slice(first, last + 1)`` per axis, in ``mask``'s axis order (voxel indices): the same
        box as :func:`scipy.ndimage.find_objects` gives for a mask, found by projecting the mask
        onto its first axis, then the rest of the box within the slab that holds voxels (two
        passes over the data, most of them stopping at the first true voxel of a row).

    Raises
    ------
    ValueError
        ``mask`` is a scalar.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        raise ValueError("bounding_box needs an array with at least one axis")
    present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if present.size == 0:
        return None
    first = slice(int(present[0]), int(present[-1]) + 1)
    if mask.ndim == 1:
        return (first,)
    rest = bounding_box(np.logical_or.reduce(mask[first], axis=0))
    if rest is None:  # not reached: the slab holds a true voxel
        raise ValueError("bounding_box: no voxel in the slab that holds one")
    return (first, *rest)


def check_accepts(spec: AlgorithmSpec, volume: Volume) -> None:
    """Raise :class:`SeriesRefused` when ``volume`` is not a series ``spec`` declares it accepts."""
    accepts = spec.accepts
    if volume.modality not in accepts.modalities:
        raise SeriesRefused(f"modality {volume.modality!r} is not one of {', '.join(accepts.modalities)}")
    if volume.voxels.shape[0] < accepts.min_slices:
        raise SeriesRefused(f"{volume.voxels.shape[0]} slices; at least {accepts.min_slices} are needed")
    limit = accepts.max_slice_thickness_mm
    if limit is not None:
        thickness = max(volume.slice_thickness_mm or 0.0, volume.spacing_mm[0])
        if thickness > limit + 0.01:
            raise SeriesRefused(f"slices of {thickness:g} mm are thicker than {limit:g} mm")
