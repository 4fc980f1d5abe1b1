"""Issue 26: the graph rewrites for OpenVINO compute what PyTorch does — transposed convolutions
as sub-pixel convolutions, for the strides, paddings and output paddings of real networks
(MONAI's UNet: kernel 3, stride 2, padding 1, output padding 1; the lung U-Net: kernel 2,
stride 2) and for ones whose output is cut to size; group normalizations in channel order (as
MONAI's SegResNet uses them); what cannot be rewritten is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ainode_sdk.declared.rewrite import rewrite_graph


def _export(module: torch.nn.Module, shape: tuple[int, ...], path) -> None:
    with torch.no_grad():
        torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                          dynamo=False)  # fmt: skip


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


@pytest.mark.parametrize(
    ("dims", "kernel", "stride", "padding", "output_padding"),
    [(3, 3, 2, 1, 1), (3, 2, 2, 0, 0), (3, 4, 2, 1, 0), (2, 3, 3, 1, 2), (2, 5, 2, 2, 0), (1, 3, 2, 1, 0),
     (3, (3, 1, 3), (2, 1, 2), (1, 0, 1), (1, 0, 0))],
)  # fmt: skip
def test_a_rewritten_transposed_convolution_gives_pytorchs_output(
    tmp_path, dims, kernel, stride, padding, output_padding
):
    torch.manual_seed(0)
    layer = getattr(torch.nn, f"ConvTranspose{dims}d")(5, 3, kernel, stride=stride, padding=padding,
                                                       output_padding=output_padding)  # fmt: skip
    network = torch.nn.Sequential(layer, torch.nn.ReLU()).eval()
    shape = (2, 5, *(6 + i for i in range(dims)))
    _export(network, shape, tmp_path / "exported.onnx")
    done = rewrite_graph(tmp_path / "exported.onnx", tmp_path / "rewritten.onnx", shape)
    assert done == ["1 transposed convolutions as sub-pixel convolutions"]
    graph = onnx.load(str(tmp_path / "rewritten.onnx"))
    assert "ConvTranspose" not in {n.op_type for n in graph.graph.node}
    x = np.random.default_rng(1).standard_normal((3, *shape[1:])).astype(np.float32)  # another batch size
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    got = _run(tmp_path / "rewritten.onnx", x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("dims", "groups", "channels"), [(3, 8, 32), (3, 1, 4), (2, 4, 4)])
def test_a_group_normalization_in_channel_order_gives_pytorchs_output(tmp_path, dims, groups, channels):
    torch.manual_seed(0)
    conv = getattr(torch.nn, f"Conv{dims}d")
    network = torch.nn.Sequential(conv(2, channels, 3, padding=1), torch.nn.GroupNorm(groups, channels),
                                  torch.nn.ReLU(), conv(channels, 3, 1)).eval()  # fmt: skip
    with torch.no_grad():  # a scale and shift of its own, as a trained network has
        network[1].weight.uniform_(0.5, 2.0)
        network[1].bias.uniform_(-1.0, 1.0)
    shape = (2, 2, *(8 + i for i in range(dims)))
    _export(network, shape, tmp_path / "exported.onnx")
    done = rewrite_graph(tmp_path / "exported.onnx", tmp_path / "rewritten.onnx", shape)
    assert done == ["1 group normalizations in channel order"]
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "rewritten.onnx")).graph.node}
    assert "InstanceNormalization" not in kinds and "Reshape" not in kinds and "Shape" not in kinds
    x = (5 + 3 * np.random.default_rng(1).standard_normal((3, *shape[1:]))).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "rewritten.onnx", x), expected, rtol=0, atol=2e-5)


def test_what_cannot_be_rewritten_is_left_and_nothing_is_written(tmp_path):
    network = torch.nn.Sequential(
        torch.nn.ConvTranspose3d(4, 4, 3, stride=2, padding=1, groups=2),  # grouped
        torch.nn.ConvTranspose3d(4, 2, 3, stride=2, dilation=2),  # dilated
        torch.nn.ConvTranspose3d(2, 2, 3, padding=1),  # stride 1: an ordinary convolution already
        torch.nn.InstanceNorm3d(2, affine=True),  # an instance norm of its own, not a group norm's
        torch.nn.ConvTranspose3d(2, 2, 1, stride=2, padding=1),  # padding beyond the kernel
    ).eval()
    _export(network, (1, 4, 5, 5, 5), tmp_path / "exported.onnx")
    assert rewrite_graph(tmp_path / "exported.onnx", tmp_path / "rewritten.onnx", (1, 4, 5, 5, 5)) == []
    assert not (tmp_path / "rewritten.onnx").exists()
