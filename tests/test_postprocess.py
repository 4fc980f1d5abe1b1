"""Issue 26: a model's post-processing runs its argmax on a channels-innermost copy (PyTorch's CPU
argmax over the first dimension of a few-channel tensor is 10-20x slower) with the labels and
metadata MONAI's own ``Compose`` gives; OpenVINO writes each window's output into an array of the
caller's, which a later window does not overwrite and which outlives the runtime's release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from ainode_sdk.declared.compiled import LOADERS, export_onnx
from ainode_sdk.declared.postprocess import CHANNELS_LAST_MAX, channels_innermost, run_postprocessing


def _prediction(channels: int) -> MetaTensor:
    logits = torch.from_numpy(np.random.default_rng(7).normal(size=(channels, 24, 20, 12)).astype(np.float32))
    logits[:, :6] = 0.0  # exact ties: the first channel wins, whatever the layout
    affine = torch.diag(torch.tensor([-0.8, -0.8, 5.0, 1.0], dtype=torch.float64))
    return MetaTensor(logits, affine=affine)


@pytest.mark.parametrize("channels", [2, 3, CHANNELS_LAST_MAX + 1])
def test_post_processing_gives_the_labels_and_metadata_of_monais_compose(channels):
    compose = mt.Compose([mt.Activationsd(keys="pred", softmax=True), mt.AsDiscreted(keys="pred", argmax=True)])
    expected = compose({"pred": _prediction(channels)})["pred"]
    got = run_postprocessing(compose, {"pred": _prediction(channels)})["pred"]
    assert torch.equal(got.as_tensor(), expected.as_tensor())
    assert int(got[:, :6].sum()) == 0  # the ties went to channel 0
    assert torch.equal(got.affine, expected.affine)
    assert got.shape == (1, 24, 20, 12)


def test_the_argmax_input_is_stored_channels_innermost_only_where_that_pays():
    few = _prediction(2)
    moved = channels_innermost(few)
    assert moved.stride(0) == 1 and moved.shape == few.shape and torch.equal(moved.as_tensor(), few.as_tensor())
    many = _prediction(CHANNELS_LAST_MAX + 1)
    assert channels_innermost(many) is many
    assert channels_innermost(moved) is moved  # already so stored: no second copy


def test_a_compose_without_an_argmax_runs_as_it_is():
    compose = mt.Compose([mt.AsDiscreted(keys="pred", threshold=0.5)])
    data = {"pred": torch.tensor([[0.2, 0.7]])}
    assert torch.equal(run_postprocessing(compose, data)["pred"], torch.tensor([[0.0, 1.0]]))


def test_openvino_outputs_are_the_callers_arrays_and_survive_later_windows_and_release(tmp_path):
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.ReLU()).eval()
    shape = (1, 1, 8, 8, 8)
    export_onnx(network, shape, tmp_path / "net.onnx")
    loaded = LOADERS["openvino"](tmp_path / "net.onnx", shape, "f32")
    rng = np.random.default_rng(0)
    first_input, second_input = (rng.random(shape, dtype=np.float32) for _ in range(2))
    first = loaded.run(first_input)
    kept = first.copy()
    second = loaded.run(second_input)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    loaded.release()
    assert np.array_equal(first, kept)  # still ours after the runtime gave its memory back
    with torch.no_grad():
        expected = network(torch.from_numpy(first_input)).numpy()
    np.testing.assert_allclose(loaded.run(first_input), expected, rtol=1e-4, atol=1e-5)


class _HalfOutput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).half()


def test_an_output_openvino_cannot_write_into_our_array_is_copied_out_as_float32(tmp_path):
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    network = _HalfOutput().eval()
    shape = (1, 1, 6, 6, 6)
    export_onnx(network, shape, tmp_path / "half.onnx")
    loaded = LOADERS["openvino"](tmp_path / "half.onnx", shape, "f32")
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    got = loaded.run(x)
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).float().numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


def test_onnx_runtime_gives_a_runs_working_memory_back(tmp_path):
    """ONNX Runtime's arena would keep a study's peak activations resident for good (wholeBody:
    +1.4 GB over the PyTorch path); without it a run's working memory goes when the run ends."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 48, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(48, 2, 3, padding=1)
    ).eval()
    shape = (1, 1, 64, 64, 64)  # 48 channels of 64^3 float32: 48 MB an activation
    export_onnx(network, shape, tmp_path / "wide.onnx")
    loaded = LOADERS["onnxruntime"](tmp_path / "wide.onnx", shape, "f32")
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    loaded.run(x)  # first run: the runtime's one-off allocations (thread pool, kernels)
    before = _rss_mb()
    for _ in range(3):
        out = loaded.run(x)
        assert out.shape == (1, 2, 64, 64, 64)
        del out
    assert _rss_mb() - before < 24
