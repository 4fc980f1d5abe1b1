"""Transposed convolutions of an ONNX graph rewritten as sub-pixel convolutions.

A strided transposed convolution (ONNX ``ConvTranspose``: MONAI's ``UNet`` up-sampling, e.g.
kernel 3, stride 2, padding 1, output padding 1) scatters every input voxel into the output;
OpenVINO's CPU plugin runs the 3D ones in float32 even when asked for bfloat16, and a layer
with few output channels (the spleen UNet's last: 32 to 2) at a fraction of its convolution
speed — 72 of the 270 ms of a spleen window batch on a Zen 4 core pair (``BENCHMARKS.md``, issue 26).

The same arithmetic as a gather: output position ``o = s*i - p + k`` of a transposed convolution
with stride ``s``, padding ``p`` and kernel tap ``k`` falls in phase ``r = o mod s``, and the
phase-``r`` outputs are an ordinary (stride 1) convolution of the input with the taps
``k ≡ r + p (mod s)``, each shifted by ``(r + p - k) / s`` input positions. One ``Conv`` computes
every phase at once (``Cout × s^d`` output channels, a kernel spanning the shifts, zeros where a
phase has no tap), and ``Reshape`` → ``Transpose`` → ``Reshape`` interleaves the phases into the
full-resolution grid (3D pixel shuffle), a ``Slice`` cuts it to the transposed convolution's size
where that is not a multiple of the stride. The output is the original's up to the order of
float32 additions (the conversion check compares it with the original framework before use).
Only ``group`` 1, dilation 1, symmetric padding, weights stored in the graph and a known spatial
input size are rewritten; other ``ConvTranspose`` nodes are left as they are.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a transposed convolution as a gather."""

    taps: tuple[tuple[tuple[int, int], ...], ...]
    """Per phase ``r``: the (kernel tap, input shift) pairs that produce outputs ``s*m + r``."""
    first_shift: int
    width: int
    """The sub-pixel kernel's size along this axis (from the smallest to the largest shift)."""
    pad_before: int
    pad_after: int
    stride: int
    out_size: int
    """The transposed convolution's output size along this axis."""
    per_phase: int
    """Outputs per phase (``ceil(out_size / stride)``)."""


def _axis(kernel: int, stride: int, pad: int, output_padding: int, in_size: int) -> _Axis:
    """How one axis of ``ConvTranspose(kernel, stride, pad, output_padding)`` on ``in_size``
    input positions becomes a stride-1 convolution per phase."""
    taps = tuple(
        tuple((k, (r + pad - k) // stride) for k in range(kernel) if (k - r - pad) % stride == 0) for r in range(stride)
    )
    shifts = [shift for phase in taps for _, shift in phase] or [0]
    out_size = (in_size - 1) * stride - 2 * pad + kernel + output_padding
    per_phase = -(-out_size // stride)
    first, last = min(shifts), max(shifts)
    return _Axis(taps, first, last - first + 1, -first, last + per_phase - in_size, stride, out_size, per_phase)


def subpixel_weights(weights: np.ndarray, axes: list[_Axis]) -> np.ndarray:
    """The sub-pixel convolution's kernel for a transposed convolution's ``weights``.

    Parameters
    ----------
    weights
        ``(in_channels, out_channels, *kernel)``, as ONNX ``ConvTranspose`` stores them.
    axes
        One per spatial axis (:func:`_axis`).

    Returns
    -------
    numpy.ndarray
        ``(out_channels * prod(strides), in_channels, *widths)`` float32; output channel
        ``c * prod(strides) + phase`` (phases in C order over the axes) holds channel ``c``'s
        phase.
    """
    in_channels, out_channels = weights.shape[:2]
    strides = tuple(a.stride for a in axes)
    kernel = np.zeros((out_channels, *strides, in_channels, *(a.width for a in axes)), np.float32)
    for phase in itertools.product(*(range(s) for s in strides)):
        for combination in itertools.product(*(a.taps[r] for a, r in zip(axes, phase, strict=True))):
            tap = tuple(k for k, _ in combination)
            # output (phase, m) reads input m + shift: the kernel's index is shift - first_shift
            where = tuple(shift - a.first_shift for a, (_, shift) in zip(axes, combination, strict=True))
            index: tuple[Any, ...] = (slice(None), *phase, slice(None), *where)
            source: tuple[Any, ...] = (slice(None), slice(None), *tap)
            kernel[index] = weights[source].T
    return kernel.reshape(out_channels * int(np.prod(strides)), in_channels, *(a.width for a in axes))


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_transposed_convolutions(source: Path, target: Path, input_shape: tuple[int, ...]) -> int:
    """Write ``source`` to ``target`` (atomically) with its transposed convolutions as sub-pixel
    convolutions, for inputs of ``input_shape`` (``(batch, channels, *spatial)``; the batch stays
    dynamic), and return how many were rewritten; nothing is written when none is.

    Raises
    ------
    onnx.checker.ValidationError, onnx.shape_inference.InferenceError, OSError
        The graph does not load or is not valid ONNX (ONNX's own errors), or ``target`` cannot
        be written.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = onnx.load(str(source))
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], input_shape[2:], strict=False):
        dim.Clear()
        dim.dim_value = size
    model = shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.value_info, *model.graph.input]
    }
    initializers = {i.name: i for i in model.graph.initializer}
    nodes, added, replaced, rewritten = [], [], set(), 0
    for node in model.graph.node:
        a = _attributes(node)
        weights_name = node.input[1] if len(node.input) > 1 else ""
        spatial = shapes.get(node.input[0], [])[2:]
        rank = len(spatial)
        pads = list(a.get("pads", [0] * 2 * rank))
        if (
            node.op_type != "ConvTranspose" or weights_name not in initializers or not spatial or 0 in spatial
            or a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1] * rank))
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a
            or pads[:rank] != pads[rank:] or all(s == 1 for s in a.get("strides", [1] * rank))
        ):  # fmt: skip
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(initializers[weights_name]).astype(np.float32)
        axes = [
            _axis(k, s, p, o, n)
            for k, s, p, o, n in zip(weights.shape[2:], a.get("strides", [1] * rank), pads[:rank],
                                     a.get("output_padding", [0] * rank), spatial, strict=True)
        ]  # fmt: skip
        out_channels, name = weights.shape[1], f"{node.name or node.output[0]}/subpixel"
        phases = int(np.prod([x.stride for x in axes]))
        added.append(numpy_helper.from_array(subpixel_weights(weights, axes), f"{name}/weights"))
        conv_inputs = [node.input[0], f"{name}/weights"]
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32)
            added.append(numpy_helper.from_array(np.repeat(bias, phases), f"{name}/bias"))
            conv_inputs.append(f"{name}/bias")
            replaced.add(node.input[2])
        replaced.add(weights_name)
        rewritten += 1
        pads_out = [x.pad_before for x in axes] + [x.pad_after for x in axes]
        nodes.append(helper.make_node("Conv", conv_inputs, [f"{name}/phases"], name=name,
                                      kernel_shape=[x.width for x in axes], pads=pads_out))  # fmt: skip
        # (batch, out, *strides, *per_phase) -> (batch, out, per_phase_0, stride_0, ...) -> full grid
        split = [0, out_channels, *(x.stride for x in axes), *(x.per_phase for x in axes)]
        grid = [0, out_channels, *(x.per_phase * x.stride for x in axes)]
        order = [0, 1, *itertools.chain.from_iterable((2 + rank + i, 2 + i) for i in range(rank))]
        added += [numpy_helper.from_array(np.array(split, np.int64), f"{name}/split"),
                  numpy_helper.from_array(np.array(grid, np.int64), f"{name}/grid")]  # fmt: skip
        nodes.append(helper.make_node("Reshape", [f"{name}/phases", f"{name}/split"], [f"{name}/split_out"]))
        nodes.append(helper.make_node("Transpose", [f"{name}/split_out"], [f"{name}/interleaved"], perm=order))
        sizes = [x.out_size for x in axes]
        if sizes == grid[2:]:
            nodes.append(helper.make_node("Reshape", [f"{name}/interleaved", f"{name}/grid"], [node.output[0]]))
            continue
        nodes.append(helper.make_node("Reshape", [f"{name}/interleaved", f"{name}/grid"], [f"{name}/full"]))
        added += [numpy_helper.from_array(np.zeros(rank, np.int64), f"{name}/starts"),
                  numpy_helper.from_array(np.array(sizes, np.int64), f"{name}/ends"),
                  numpy_helper.from_array(np.arange(2, 2 + rank, dtype=np.int64), f"{name}/axes")]  # fmt: skip
        nodes.append(helper.make_node("Slice", [f"{name}/full", f"{name}/starts", f"{name}/ends", f"{name}/axes"],
                                      [node.output[0]]))  # fmt: skip
    if not rewritten:
        return 0
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *added])
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, target)
    return rewritten
