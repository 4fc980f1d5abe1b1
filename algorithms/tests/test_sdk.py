"""The plugin SDK on its own: it installs with numpy and pydantic alone (no torch, MONAI, ONNX
Runtime, no ainode node) and these tests run there (``tests/test_sdk_alone.py`` makes that venv)."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import numpy as np
import pytest

from ainode_sdk.base import (
    AlgorithmResult,
    AlgorithmSpec,
    Measurement,
    NoParams,
    Resources,
    Segment,
    SeriesRequirements,
    Volume,
    bounding_box,
    check_accepts,
)
from ainode_sdk.codes import ANATOMICAL_STRUCTURE
from ainode_sdk.declared.model import RUNTIMES, register_runtime
from ainode_sdk.declared.spec import LabelSpec
from ainode_sdk.errors import PluginLoadError, SeriesRefused
from ainode_sdk.registry import Registry
from ainode_sdk.validate import validate_result

LIVER = ("10200004", "SCT", "Liver")
VOLUME_ML = ("118565006", "SCT", "Volume")
ML = ("ml", "UCUM", "milliliter")


def _volume(slices: int = 10) -> Volume:
    return Volume(np.zeros((slices, 8, 8), np.float32), (2.0, 1.0, 1.0), np.eye(4), "CT", 2.0)


class Threshold:
    """A plugin as a site would write one: voxels over a threshold, and their volume."""

    Params = NoParams
    spec = AlgorithmSpec(
        name="threshold", version="1.0", description="voxels over 0 HU",
        accepts=SeriesRequirements(modalities=("CT",), min_slices=5), outputs=("SEG", "SR"),
        resources=Resources(memory_gib=0.1),
    )  # fmt: skip

    def run(self, volume: Volume, params: NoParams, device: str = "cpu") -> AlgorithmResult:
        mask = volume.voxels > 0
        ml = float(mask.sum()) * float(np.prod(volume.spacing_mm)) / 1000
        return AlgorithmResult(
            segments=[Segment("Liver", mask, ANATOMICAL_STRUCTURE, LIVER)],
            measurements=[Measurement("Liver", VOLUME_ML, ml, ML)],
        )


def test_a_plugin_written_against_the_sdk_validates():
    volume = _volume()
    volume.voxels[2:4, 2:4, 2:4] = 50
    result = Threshold().run(volume, NoParams())
    assert validate_result(result, volume) == []
    assert result.measurements[0].value == pytest.approx(8 * 2.0 / 1000)
    assert bounding_box(result.segments[0].mask) == (slice(2, 4), slice(2, 4), slice(2, 4))


def test_validate_result_names_what_is_wrong():
    volume = _volume()
    bad = AlgorithmResult(
        segments=[Segment("Liver", np.zeros((3, 3, 3), bool), ANATOMICAL_STRUCTURE, ("", "SCT", "Liver"))],
        measurements=[Measurement("Spleen", VOLUME_ML, float("nan"), ("ml", "mL", "milliliter"))],
    )
    problems = "\n".join(validate_result(bad, volume))
    for expected in ("mask shape", "property type", "no such segment", "not UCUM", "not finite"):
        assert expected in problems


def test_check_accepts_refuses_with_a_reason():
    check_accepts(Threshold.spec, _volume(10))
    with pytest.raises(SeriesRefused, match="at least 5"):
        check_accepts(Threshold.spec, _volume(3))


def test_the_registry_loads_plugins_from_entry_points_and_reports_failures():
    here = f"{__name__}:Threshold"
    registry = Registry([EntryPoint("threshold", here, "ainode.algorithms"),
                         EntryPoint("broken", f"{__name__}:Missing", "ainode.algorithms")])  # fmt: skip
    assert registry.get("threshold").spec.version == "1.0"
    assert registry.entry_point("threshold") == here
    with pytest.raises(PluginLoadError, match="failed to load"):
        registry.get("broken")
    assert [s.name for s in registry.specs()] == ["threshold"]


def test_model_runtimes_are_a_registry_of_types():
    assert {"monai_bundle", "torchscript", "onnx"} <= set(RUNTIMES)
    register_runtime("openvino", "my_site.runtimes:OpenVinoRuntime")
    assert RUNTIMES.pop("openvino") == "my_site.runtimes:OpenVinoRuntime"


def test_label_codes_may_be_yaml_integers():
    assert LabelSpec.model_validate({"label": "Spleen", "type": [78961009, "SCT", "Spleen"]}).type[0] == "78961009"


def test_the_sdk_imports_no_heavy_runtime():
    import subprocess
    import sys

    code = (
        "import sys, ainode_sdk.base, ainode_sdk.registry, ainode_sdk.validate, ainode_sdk.declared.model, "
        "ainode_sdk.declared.spec; print(sorted({'torch', 'monai', 'onnxruntime', 'node', 'highdicom', 'pydicom'}"
        " & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
