"""A declared model as an algorithm: run by name like any plugin, loaded once per process.

:class:`DeclaredModel` turns a :class:`~ainode_sdk.declared.spec.ModelDeclaration` into an
:class:`~ainode_sdk.base.Algorithm`: its spec (name, version, accepted series, outputs, resources,
weights checksum), and ``run``, which takes the loaded runtime from :class:`ModelCache` (loading it
the first time, again when the weights file changed), infers a label map, and returns one segment
per label that occurs, with the declared measurements (volume in ml; mean, median, standard
deviation, minimum, maximum and percentiles of the voxel values — HU for CT).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from ainode_sdk.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Device,
    Measurement,
    NoParams,
    Resources,
    Segment,
    SeriesRequirements,
    Volume,
    check_accepts,
)
from ainode_sdk.codes import (
    ATTENUATION,
    HU,
    MAXIMUM,
    MEAN,
    MEDIAN,
    MINIMUM,
    ML,
    NO_UNITS,
    VOLUME,
)
from ainode_sdk.codes import SIGNAL_INTENSITY as INTENSITY
from ainode_sdk.codes import STANDARD_DEVIATION as STD
from ainode_sdk.declared.spec import ModelDeclaration, file_sha256
from ainode_sdk.errors import ModelError


class Runtime(Protocol):
    """A loaded model: ``infer`` gives labels on the volume's grid and seconds per stage."""

    memory_bytes: int

    def infer(self, volume: Volume) -> tuple[npt.NDArray[np.int32], dict[str, float]]:
        """Labels ``(slices, rows, columns)`` and ``{"preprocess_s", "inference_s", "postprocess_s"}``."""
        ...


RuntimeFactory = Callable[[ModelDeclaration, Device], Runtime]
"""Loads a declared model onto a device."""

RUNTIMES: dict[str, str] = {
    "monai_bundle": "ainode_sdk.declared.bundle:MonaiBundleRuntime",
    "torchscript": "ainode_sdk.declared.exported:TorchScriptRuntime",
    "onnx": "ainode_sdk.declared.exported:OnnxRuntime",
}
"""The runtime registry: declaration ``type`` -> the runtime class (``module:attribute``, imported
when first used, so that torch, MONAI or ONNX Runtime load only for the models that need them).
A new runtime is one entry here (or :func:`register_runtime`)."""


def register_runtime(type_name: str, target: str) -> None:
    """Make declarations of ``type: type_name`` load with ``target`` (``"module:Class"``, a
    :data:`RuntimeFactory`)."""
    RUNTIMES[type_name] = target


def _runtime(declaration: ModelDeclaration, device: Device) -> Runtime:
    """The runtime of ``declaration`` from :data:`RUNTIMES`.

    Raises
    ------
    ModelError
        No runtime is registered for its type.
    """
    target = RUNTIMES.get(declaration.type)
    if target is None:
        raise ModelError(f"no runtime for model type {declaration.type!r} (known: {', '.join(sorted(RUNTIMES))})")
    module, _, attribute = target.partition(":")
    factory: RuntimeFactory = getattr(importlib.import_module(module), attribute)
    return factory(declaration, device)


@dataclass
class LoadedModel:
    """A model held in memory by this process."""

    runtime: Runtime
    stamp: tuple[int, int, int]
    device: Device
    loaded_at: float
    load_s: float
    sha256: str


@dataclass
class ModelCache:
    """Models loaded in this process, by name; a model is loaded once and reused for the next study,
    and loaded again when its weights file changes (``loads`` counts the loads per model)."""

    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    loads: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str, declaration: ModelDeclaration, device: Device) -> LoadedModel:
        """The loaded model ``name`` (loading or reloading it as needed).

        Raises
        ------
        ModelError
            The weights do not match the declared checksum, or the model cannot be loaded.
        """
        weights = declaration.weights_path()
        st = weights.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self.lock:
            held = self.loaded.get(name)
            if held is not None and held.stamp == stamp and held.device == device:
                return held
            start = time.perf_counter()
            sha256 = file_sha256(weights)
            if declaration.sha256 is not None and sha256 != declaration.sha256:
                raise ModelError(
                    f"model {name}: weights {weights.name} have SHA-256 {sha256[:12]}..., not the declared one"
                )
            self.loaded.pop(name, None)  # free the old weights before the new ones load
            runtime = _runtime(declaration, device)
            held = LoadedModel(runtime, stamp, device, time.time(), time.perf_counter() - start, sha256)
            self.loaded[name] = held
            self.loads[name] = self.loads.get(name, 0) + 1
            return held

    def status(self) -> dict[str, dict[str, Any]]:
        """Per loaded model: device, memory of its weights (bytes), when and how often it loaded."""
        return {
            name: {
                "device": m.device, "memory_bytes": m.runtime.memory_bytes, "loaded_at": m.loaded_at,
                "load_s": round(m.load_s, 3), "loads": self.loads.get(name, 0), "sha256": m.sha256,
            }
            for name, m in self.loaded.items()
        }  # fmt: skip


CACHE = ModelCache()
"""The models loaded in this process (the node's model worker holds them between studies)."""


class DeclaredModel:
    """A model declared in the configuration, as an algorithm (see the module docstring)."""

    Params: type[BaseModel] = NoParams

    def __init__(self, name: str, declaration: ModelDeclaration, cache: ModelCache | None = None) -> None:
        self.name = name
        self.declaration = declaration
        self.cache = cache or CACHE
        metadata = declaration.bundle_metadata()
        version = declaration.version or str(metadata.get("version") or "1")
        description = declaration.description or str(metadata.get("name") or f"{declaration.type} model")
        accepts = declaration.accepts
        self.spec = AlgorithmSpec(
            name=declaration.name or name,
            version=version,
            description=description[:64],
            accepts=SeriesRequirements(
                modalities=tuple(accepts.modalities), min_slices=accepts.min_slices,
                max_slice_thickness_mm=accepts.max_slice_thickness_mm,
            ),
            outputs=tuple(declaration.outputs),
            resources=Resources(memory_gib=declaration.resources.memory_gib, gpu=declaration.resources.gpu),
            weights_sha256=declaration.sha256,
            manufacturer=(declaration.manufacturer or str(metadata.get("authors") or "") or "ainode")[:64],
        )  # fmt: skip
        self.labels = declaration.label_table()
        self.last_timings: dict[str, float] = {}

    def run(self, volume: Volume, device: Device, params: Any = None) -> AlgorithmResult:
        """Segment ``volume`` with the model and measure each segment that occurs.

        Raises
        ------
        ainode_sdk.errors.SeriesRefused
            The series is not one the declaration accepts.
        ModelError
            The model cannot be loaded, or its output holds a label value the table lacks.
        """
        check_accepts(self.spec, volume)
        loaded = self.cache.get(self.name, self.declaration, device)
        raw, timings = loaded.runtime.infer(volume)
        start = time.perf_counter()
        result = self._result(volume, raw, loaded.sha256)
        timings["measure_s"] = time.perf_counter() - start
        self.last_timings = {"load_s": loaded.load_s, **timings}
        return result

    def _result(self, volume: Volume, raw: npt.NDArray[np.int32], sha256: str) -> AlgorithmResult:
        present = [int(v) for v in np.unique(raw) if v != 0]
        unknown = [v for v in present if v not in self.labels]
        if unknown:
            raise ModelError(f"model {self.name}: output label value(s) {unknown[:5]} not in its label table")
        lut = np.zeros(int(raw.max(initial=0)) + 1, dtype=np.uint16)
        for number, value in enumerate(present, start=1):
            lut[value] = number
        label_map = lut[raw]
        segments, measurements = [], []
        counts = np.bincount(label_map.ravel(), minlength=len(present) + 1)
        hu = volume.modality == "CT"
        for number, value in enumerate(present, start=1):
            spec = self.labels[value]
            codes = spec.codes()
            segments.append(
                Segment(
                    label=spec.label, mask=np.empty(0, dtype=bool), category=codes["category"] or VOLUME,
                    property_type=codes["type"] or VOLUME, type_modifier=codes["modifier"],
                    anatomic_region=codes["region"], colour=tuple(spec.colour) if spec.colour else None,  # type: ignore[arg-type]
                )
            )  # fmt: skip
            values = volume.voxels[label_map == number] if len(self.declaration.measurements) > 1 else None
            for name in self.declaration.measurements:
                measurements.append(_measure(name, spec.label, int(counts[number]), values, volume.voxel_volume_ml, hu))
        return AlgorithmResult(
            segments=segments,
            measurements=measurements,
            parameters={"model_type": self.declaration.type, "weights_sha256": sha256},
            label_map=label_map,
        )


def _measure(
    name: str, label: str, count: int, values: npt.NDArray[np.float32] | None, voxel_ml: float, hu: bool
) -> Measurement:
    """One declared measurement of one segment."""
    if name == "volume":
        return Measurement(label, VOLUME, round(count * voxel_ml, 2), ML)
    assert values is not None
    concept, unit = (ATTENUATION, HU) if hu else (INTENSITY, NO_UNITS)
    if name.startswith("p"):
        q = int(name[1:])
        value = float(np.percentile(values, q))
        return Measurement(label, concept, round(value, 1), unit, (f"P{q}", "99AINODE", f"{q}th percentile"))
    derivation = {"mean": MEAN, "median": MEDIAN, "std": STD, "min": MINIMUM, "max": MAXIMUM}[name]
    statistics: dict[str, Any] = {"mean": np.mean, "median": np.median, "std": np.std, "min": np.min, "max": np.max}
    return Measurement(label, concept, round(float(statistics[name](values)), 1), unit, derivation)
