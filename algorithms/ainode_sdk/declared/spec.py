"""Declarations of the sites' own trained models (``models:`` in the configuration), and their labels.

A declaration names a runtime (``monai_bundle``, ``torchscript``, ``onnx``), where the model is, the
series it accepts, its label table (output channel or label value -> segment label, Segmented
Property Category/Type/Modifier codes, colour), the measurements per segment, its outputs and its
resources. For a MONAI bundle the label table may come from the bundle itself: the names of
``metadata.json``'s ``network_data_format.outputs.pred.channel_def`` looked up in a mapping table
(the TotalSegmentator SNOMED CT table's columns) given as ``label_mapping``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ainode_sdk.base import Code
from ainode_sdk.codes import ANATOMICAL_STRUCTURE

KNOWN_SCHEMES = ("SCT", "DCM", "LN", "UCUM", "FMA", "RADLEX", "NCIt", "UMLS", "MDC")
"""Coding scheme designators a label code may use besides private ones (``99...``, PS3.16 8.2)."""

MEASUREMENTS = ("volume", "mean", "median", "std", "min", "max")
"""Per-segment measurements a model may declare; ``pNN`` (e.g. ``p15``) adds a percentile."""


def _code(value: Any) -> Code:
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, str) and v for v in value):
        value_, scheme, meaning = value
        if scheme not in KNOWN_SCHEMES and not scheme.startswith("99"):
            raise ValueError(f"unknown coding scheme {scheme!r} (use one of {', '.join(KNOWN_SCHEMES)} or a 99 prefix)")
        return (value_, scheme, meaning)
    raise ValueError("a code is [value, scheme designator, meaning]")


def _code_text(value: Any) -> Any:
    """A code's part as text: YAML reads a SNOMED CT code such as ``78961009`` as an integer."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


CodeList = Annotated[list[Annotated[str, BeforeValidator(_code_text)]], Field(min_length=3, max_length=3)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class LabelSpec(_Model):
    """One label of a model's output: what the segment of that channel or value is."""

    label: Annotated[str, Field(min_length=1, max_length=64)]
    type: CodeList
    category: CodeList = list(ANATOMICAL_STRUCTURE)
    modifier: CodeList | None = None
    region: CodeList | None = None
    colour: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)] | None = None

    @model_validator(mode="after")
    def _codes(self) -> LabelSpec:
        for name in ("type", "category", "modifier", "region"):
            value = getattr(self, name)
            if value is not None:
                try:
                    _code(value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return self

    def codes(self) -> dict[str, Code | None]:
        """The label's codes as plain tuples."""
        return {
            "category": _code(self.category),
            "type": _code(self.type),
            "modifier": _code(self.modifier) if self.modifier else None,
            "region": _code(self.region) if self.region else None,
        }


class SeriesAccepted(_Model):
    """The series a model accepts (the node refuses others before running it)."""

    modalities: list[str] = ["CT"]
    min_slices: Annotated[int, Field(ge=1)] = 1
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] | None = None
    body_parts: list[str] = []


class ModelResources(_Model):
    """What one run needs, and where it may run."""

    memory_gib: Annotated[float, Field(gt=0)] = 4.0
    gpu_memory_gib: Annotated[float, Field(ge=0)] = 2.0
    gpu: Literal["required", "optional", "none"] = "optional"
    cpu_fallback: bool = Field(
        default=True, description="an 'optional' model runs on the CPU when no GPU has room (else it waits)"
    )


class ScaleIntensity(_Model):
    """MONAI's ``ScaleIntensityRange``: ``[a_min, a_max]`` mapped linearly onto ``[b_min, b_max]``
    (HU in; e.g. HU + 1024 is ``a_min: -1024, a_max: 3071, b_min: 0, b_max: 4095``), clipped to
    that range with ``clip``."""

    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool = True


class Preprocessing(_Model):
    """Declared pre-processing of a TorchScript or ONNX model (what its training used), in MONAI's
    conventions.

    A 3D model (the default): the image is oriented to ``orientation``, resampled to ``spacing_mm``
    (x, y, z), its intensities windowed to ``[window_min, window_max]`` and scaled to ``[0, 1]``,
    and the network runs over it by sliding window (``roi_size``).

    A 2D model (``slices: true``): the network sees axial slices in their stored orientation (rows,
    columns as in the DICOM frames), ``slice_batch`` at a time (MONAI's ``SliceInferer``), each
    resampled in-plane to ``matrix`` (rows, columns) and its output back (MONAI's ``Resize``),
    intensities as ``scale_intensity`` says.
    """

    spacing_mm: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] | None = None
    orientation: str = "RAS"
    window_min: float | None = None
    window_max: float | None = None
    clip: bool = True
    normalize: Literal["none", "nonzero", "all"] = "none"
    roi_size: Annotated[list[Annotated[int, Field(ge=8)]], Field(min_length=3, max_length=3)] = [96, 96, 96]
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    sw_batch_size: Annotated[int, Field(ge=1)] = 4
    mode: Literal["constant", "gaussian"] = "constant"
    slices: bool = Field(default=False, description="a 2D model: axial slices in stored orientation")
    matrix: Annotated[list[Annotated[int, Field(ge=8)]], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="2D: the in-plane size (rows, columns) the network expects; slices are resampled"
    )
    slice_batch: Annotated[int, Field(ge=1)] = Field(default=8, description="2D: slices per network call")
    scale_intensity: ScaleIntensity | None = None


class Postprocessing(_Model):
    """How a model's output becomes labels: ``argmax`` over channels (softmax first), or
    ``threshold`` of a single channel (after a sigmoid, or ``activation: none`` when the network
    already gives probabilities); optionally only the largest connected component of each label
    is kept."""

    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    discretize: Literal["argmax", "threshold"] = "argmax"
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    largest_component: bool = False


class ModelDeclaration(_Model):
    """A site's trained model, declared in ``models:`` and routed to by name like any algorithm."""

    type: Literal["monai_bundle", "torchscript", "onnx"]
    path: Path
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = Field(
        default=None,
        description="the model's name, shared by its versions declared side by side (TID 4019 Algorithm Name); "
        "default: the declaration's key",
    )
    version: str | None = Field(default=None, description="default: the bundle's metadata.json version")
    runtime: Literal["native", "onnxruntime", "openvino", "auto"] = Field(
        default="native",
        description="on the CPU: run the network by ONNX Runtime or OpenVINO (converted once, cached, checked "
        "against the original framework at load; refused if it disagrees), or auto: the fastest that agrees",
    )
    description: str = ""
    manufacturer: str = Field(
        default="", description="who made the model (IHE AIR Contributing Equipment); default: the bundle's authors"
    )
    weights: str | None = Field(
        default=None, description="monai_bundle: file under models/ (default model.pt); others: the path itself"
    )
    overrides: dict[str, Any] = Field(default={}, description="monai_bundle: config overrides, e.g. a low-res switch")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        default=None, description="expected SHA-256 of the weights; a different file is refused"
    )
    accepts: SeriesAccepted = SeriesAccepted()
    labels: dict[int, LabelSpec] = {}
    label_mapping: Path | None = Field(
        default=None, description="monai_bundle: CSV mapping channel_def names to codes (TotalSegmentator's columns)"
    )
    measurements: list[Annotated[str, Field(pattern=r"^(volume|mean|median|std|min|max|p\d{1,2})$")]] = [
        "volume",
        "mean",
    ]
    outputs: list[Literal["SEG", "SR"]] = ["SEG", "SR"]
    resources: ModelResources = ModelResources()
    preprocessing: Preprocessing | None = None
    postprocessing: Postprocessing = Postprocessing()
    half_precision: bool = False

    @model_validator(mode="after")
    def _check(self) -> ModelDeclaration:
        problem = declaration_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def weights_path(self) -> Path:
        """The file holding the trained weights."""
        if self.type == "monai_bundle":
            name = self.weights or _bundle_default_weights(self)
            return self.path / "models" / name
        return self.path

    def bundle_metadata(self) -> dict[str, Any]:
        """``configs/metadata.json`` of a bundle (``{}`` for other types)."""
        if self.type != "monai_bundle":
            return {}
        metadata: dict[str, Any] = json.loads((self.path / "configs" / "metadata.json").read_text())
        return metadata

    def label_table(self) -> dict[int, LabelSpec]:
        """Output value -> label: the declared table, else the bundle's ``channel_def`` names mapped
        through ``label_mapping`` (background, value 0, excluded).

        Raises
        ------
        ValueError
            A channel name is not in the mapping table.
        """
        if self.labels:
            return dict(self.labels)
        names = self.bundle_metadata()["network_data_format"]["outputs"]["pred"]["channel_def"]
        mapping = load_label_mapping(self.label_mapping) if self.label_mapping else {}
        table, missing = {}, []
        for value, name in sorted(((int(k), v) for k, v in names.items())):
            if value == 0:
                continue
            if name in mapping:
                table[value] = mapping[name]
            else:
                missing.append(name)
        if missing:
            raise ValueError(
                f"labels: no codes for channel(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                " (give labels: or a label_mapping that names them)"
            )
        return table


def _bundle_default_weights(declaration: ModelDeclaration) -> str:
    """The weights file a bundle's ``checkpointloader`` names after the declared overrides (e.g. the
    wholeBody bundle's ``model_lowres.pt`` when ``displayable_configs#highres`` is false)."""
    config = json.loads((declaration.path / "configs" / "inference.json").read_text())
    modelname = config.get("modelname")
    if isinstance(modelname, str) and "highres" in modelname:
        highres = declaration.overrides.get("displayable_configs#highres", True)
        return "model.pt" if highres else "model_lowres.pt"
    return "model.pt"


def declaration_problem(declaration: ModelDeclaration) -> str | None:
    """What is wrong with a declaration that its schema cannot see (files, label coverage), as
    ``key: problem``, or ``None``."""
    if declaration.type == "monai_bundle":
        for part in ("configs/inference.json", "configs/metadata.json"):
            if not (declaration.path / part).is_file():
                return f"path: {declaration.path} is not a MONAI bundle (no {part})"
        metadata = declaration.bundle_metadata()
        try:
            channels = int(metadata["network_data_format"]["outputs"]["pred"]["num_channels"])
            table = declaration.label_table()
        except (KeyError, TypeError, ValueError) as exc:
            return str(exc) if isinstance(exc, ValueError) else f"path: metadata.json lacks {exc}"
        uncovered = [v for v in range(1, channels) if v not in table]
        if uncovered:
            return f"labels: output channel(s) {', '.join(map(str, uncovered[:8]))} have no label"
    else:
        if declaration.preprocessing is None:
            return f"preprocessing: needed for a {declaration.type} model (what its training used)"
        if not declaration.labels:
            return f"labels: needed for a {declaration.type} model (output value -> segment)"
    weights = declaration.weights_path()
    if not weights.is_file():
        return f"{'weights' if declaration.type == 'monai_bundle' else 'path'}: {weights} does not exist"
    if declaration.type == "onnx":
        try:
            outputs = onnx_output_channels(weights)
        except Exception as exc:  # onnx raises protobuf's DecodeError (and others) for a file that is not a model
            return f"path: {weights} is not an ONNX model ({type(exc).__name__})"
        top = max(declaration.labels) if declaration.labels else 0
        if outputs is not None and declaration.postprocessing.discretize == "argmax" and top > outputs - 1:
            return f"labels: label value {top} but the model has {outputs} output channel(s)"
        if outputs is not None and outputs > 1 and declaration.postprocessing.discretize == "argmax":
            uncovered = [v for v in range(1, outputs) if v not in declaration.labels]
            if uncovered:
                return f"labels: output channel(s) {', '.join(map(str, uncovered[:8]))} have no label"
    return None


def onnx_output_channels(path: Path) -> int | None:
    """The channel count (axis 1) of an ONNX model's first output, when the graph states it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) > 1 and dims[1].dim_value > 0 else None


def load_label_mapping(path: Path) -> dict[str, LabelSpec]:
    """Structure name -> label from a CSV with the TotalSegmentator mapping table's columns
    (Structure, SegmentedPropertyCategory/Type/TypeModifierCodeSequence.*, AnatomicRegionSequence.*,
    DicomRGBColor)."""
    out: dict[str, LabelSpec] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):

            def code(prefix: str, row: dict[str, str] = row) -> list[str] | None:
                parts = [
                    row.get(f"{prefix}.{k}", "").strip() for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
                ]
                return parts if all(parts) else None

            name = row["Structure"].strip()
            colour = [int(c) for c in re.findall(r"\d+", row.get("DicomRGBColor", ""))][:3] or None
            out[name] = LabelSpec(
                label=_display_name(name),
                type=code("SegmentedPropertyTypeCodeSequence") or [name, "99AINODE", name],
                category=code("SegmentedPropertyCategoryCodeSequence") or list(ANATOMICAL_STRUCTURE),
                modifier=code("SegmentedPropertyTypeModifierCodeSequence"),
                region=code("AnatomicRegionSequence"),
                colour=colour if colour and len(colour) == 3 else None,
            )
    return out


def _display_name(name: str) -> str:
    """``kidney_left`` -> ``Kidney left``, ``vertebrae_L1`` -> ``Vertebrae L1``."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (weights), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
