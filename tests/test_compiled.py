"""Issue 26 (compiled inference): a declared MONAI bundle with ``runtime: onnxruntime`` (or
``openvino``, ``auto``) runs its network compiled, exported once into a cache keyed by the weights'
SHA-256 and the runtimes' versions; a conversion that disagrees with PyTorch is refused with its
reason and the model runs on PyTorch; changed weights make a new export."""

from __future__ import annotations

import pytest

from ainode_sdk.declared.bundle import MonaiBundleRuntime
from ainode_sdk.declared.compiled import Compiled
from ainode_sdk.declared.spec import ModelDeclaration

from .models import SPLEEN, seeded_bundle, spleen_declaration

pytestmark = [pytest.mark.slow]

BRANCHY = {"network_def": {"_target_": "tests.plugins.BranchyNet"}}


def test_a_conversion_that_disagrees_is_refused_and_the_model_runs_on_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv("AINODE_MODEL_CACHE", str(tmp_path / "cache"))
    bundle = seeded_bundle(SPLEEN, tmp_path / "branchy", overrides=BRANCHY)
    declaration = ModelDeclaration.model_validate(spleen_declaration(bundle, runtime="onnxruntime", overrides=BRANCHY))
    runtime = MonaiBundleRuntime(declaration, "cpu")
    print("runs on:", runtime.runtime_used)
    assert runtime.predictor is runtime.network  # PyTorch, the original framework
    assert "onnxruntime: refused" in runtime.runtime_used and "of labels agree with PyTorch" in runtime.runtime_used


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "openvino"])
def test_a_conversion_that_agrees_is_used_once_and_changed_weights_make_a_new_one(tmp_path, monkeypatch, runtime_name):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AINODE_MODEL_CACHE", str(cache))
    bundle = seeded_bundle(SPLEEN, tmp_path / "first", favour=(1,))
    declaration = ModelDeclaration.model_validate(spleen_declaration(bundle, runtime=runtime_name))
    runtime = MonaiBundleRuntime(declaration, "cpu")
    print("runs on:", runtime.runtime_used)
    assert isinstance(runtime.predictor, Compiled) and runtime.predictor.runtime == runtime_name
    assert runtime.predictor.agreement >= 0.999
    (export,) = cache.glob("*.onnx")
    stamp = export.stat().st_mtime_ns
    MonaiBundleRuntime(declaration, "cpu")  # loaded again: the cached export serves
    assert list(cache.glob("*.onnx")) == [export] and export.stat().st_mtime_ns == stamp
    retrained = seeded_bundle(SPLEEN, tmp_path / "second", seed=1, favour=(1,))
    MonaiBundleRuntime(ModelDeclaration.model_validate(spleen_declaration(retrained, runtime=runtime_name)), "cpu")
    assert len(list(cache.glob("*.onnx"))) == 2  # new weights, a new export; the old one is not used for them
