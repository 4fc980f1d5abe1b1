"""Rewrites of an exported ONNX graph that OpenVINO's CPU plugin runs faster, each computing what
the original does up to the order of float32 operations (the conversion check compares the
rewritten graph with the original framework before it is used, :mod:`.compiled`).

**Transposed convolutions as sub-pixel convolutions.** A strided transposed convolution (ONNX
``ConvTranspose``: MONAI's ``UNet`` up-sampling, e.g. kernel 3, stride 2, padding 1, output
padding 1) scatters every input voxel into the output; OpenVINO runs the 3D ones in float32 even
when asked for bfloat16, and one with few output channels (the spleen UNet's last: 32 to 2) at a
fraction of its convolution speed — 108 of the 270 ms of a spleen window batch on a Zen 4 core
pair (``BENCHMARKS.md``, issue 26). The same arithmetic as a gather: output position
``o = s*i - p + k`` of a transposed convolution with stride ``s``, padding ``p`` and kernel tap
``k`` falls in phase ``r = o mod s``, and the phase-``r`` outputs are an ordinary (stride 1)
convolution of the input with the taps ``k ≡ r + p (mod s)``, each shifted by ``(r + p - k) / s``
input positions. One ``Conv`` computes every phase at once (``Cout × s^d`` output channels, a
kernel spanning the shifts, zeros where a phase has no tap); ``Reshape`` → ``Transpose`` →
``Reshape`` interleaves the phases into the full-resolution grid (pixel shuffle) and a ``Slice``
cuts it to the transposed convolution's size where that is not a multiple of the stride. Only
``group`` 1, dilation 1, symmetric padding and weights stored in the graph are rewritten.

**Group normalization in channel order.** PyTorch exports ``GroupNorm`` (MONAI's ``SegResNet``)
as ``Reshape`` to ``(batch, groups, -1)`` → ``InstanceNormalization`` → ``Reshape`` back, then the
per-channel scale and shift; OpenVINO keeps convolutions in channels-last blocks, so each of those
reshapes costs a full reorder of the activations to the planar layout and back — 570 of the
3070 ms of a wholeBody low-resolution window on a Zen 4 core pair. The same statistics without a
reshape: each channel's mean (``ReduceMean`` over the spatial axes), its group's mean (a 1x1
``Conv`` of the channel means with a block matrix of ``1 / channels per group``), the centred
values, their group variance the same way (two passes, as ``InstanceNormalization`` computes
it), and the centred values divided by ``sqrt(variance + epsilon)``; everything element-wise on
the activations in whatever layout they are in.

Both need the spatial input size (the window the network is compiled for); nodes that do not
match a pattern exactly are left as they are.
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


def _subpixel_weights(weights: np.ndarray, axes: list[_Axis]) -> np.ndarray:
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


class _Graph:
    """The graph being rewritten: static shapes (input spatial size fixed), constants (initializers
    and ``Constant`` nodes), each tensor's producer and consumers, and what the rewrites add."""

    def __init__(self, model: Any, input_shape: tuple[int, ...]) -> None:
        from onnx import numpy_helper, shape_inference

        for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], input_shape[2:], strict=False):
            dim.Clear()
            dim.dim_value = size
        self.model = shape_inference.infer_shapes(model, data_prop=True)  # sizes through Shape -> Reshape
        graph = self.model.graph
        self.shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in [*graph.value_info, *graph.input]
        }
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.added: list[Any] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        """A new initializer ``name`` holding ``value``; its name."""
        from onnx import numpy_helper

        self.added.append(numpy_helper.from_array(value, name))
        return name

    def spatial(self, tensor: str) -> list[int]:
        """The spatial size of ``tensor`` (empty when not known)."""
        sizes = self.shapes.get(tensor, [])[2:]
        return [] if 0 in sizes else sizes


Replacement = dict[int, list[Any]]
"""Node (by ``id``) to the nodes that take its place (none: removed)."""


def _transposed_convolution(node: Any, graph: _Graph) -> Replacement | None:
    """A strided ``ConvTranspose`` as a sub-pixel convolution (see the module docstring)."""
    from onnx import helper

    a = _attributes(node)
    spatial = graph.spatial(node.input[0])
    rank = len(spatial)
    pads = list(a.get("pads", [0] * 2 * rank))
    weights = graph.constants.get(node.input[1]) if len(node.input) > 1 else None
    if (
        weights is None or not spatial or a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1] * rank))
        or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a
        or pads[:rank] != pads[rank:] or all(s == 1 for s in a.get("strides", [1] * rank))
    ):  # fmt: skip
        return None
    axes = [
        _axis(k, s, p, o, n)
        for k, s, p, o, n in zip(weights.shape[2:], a.get("strides", [1] * rank), pads[:rank],
                                 a.get("output_padding", [0] * rank), spatial, strict=True)
    ]  # fmt: skip
    bias = graph.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(0)
    if bias is None or any(x.pad_before < 0 or x.pad_after < 0 for x in axes):  # computed bias; padding ≥ kernel
        return None
    out_channels, name = weights.shape[1], f"{node.name or node.output[0]}/subpixel"
    phases = int(np.prod([x.stride for x in axes]))
    inputs = [node.input[0], graph.constant(f"{name}/weights", _subpixel_weights(weights.astype(np.float32), axes))]
    if bias.size:
        inputs.append(graph.constant(f"{name}/bias", np.repeat(bias.astype(np.float32), phases)))
    # (batch, out * phases, *per_phase) -> (batch, out, *strides, *per_phase)
    # -> (batch, out, per_phase_0, stride_0, ...) -> the full grid
    split = graph.constant(f"{name}/split", np.array([0, out_channels, *(x.stride for x in axes),
                                                       *(x.per_phase for x in axes)], np.int64))  # fmt: skip
    full = [x.per_phase * x.stride for x in axes]
    grid = graph.constant(f"{name}/grid", np.array([0, out_channels, *full], np.int64))
    order = [0, 1, *itertools.chain.from_iterable((2 + rank + i, 2 + i) for i in range(rank))]
    sizes = [x.out_size for x in axes]
    shuffled = node.output[0] if sizes == full else f"{name}/full"
    nodes = [
        helper.make_node("Conv", inputs, [f"{name}/phases"], name=name, kernel_shape=[x.width for x in axes],
                         pads=[x.pad_before for x in axes] + [x.pad_after for x in axes]),
        helper.make_node("Reshape", [f"{name}/phases", split], [f"{name}/split_out"]),
        helper.make_node("Transpose", [f"{name}/split_out"], [f"{name}/interleaved"], perm=order),
        helper.make_node("Reshape", [f"{name}/interleaved", grid], [shuffled]),
    ]  # fmt: skip
    if sizes != full:
        starts = graph.constant(f"{name}/starts", np.zeros(rank, np.int64))
        ends = graph.constant(f"{name}/ends", np.array(sizes, np.int64))
        axes_ = graph.constant(f"{name}/axes", np.arange(2, 2 + rank, dtype=np.int64))
        nodes.append(helper.make_node("Slice", [shuffled, starts, ends, axes_], [node.output[0]]))
    return {id(node): nodes}


def _group_normalization(node: Any, graph: _Graph) -> Replacement | None:
    """``Reshape`` → ``InstanceNormalization`` (scale 1, bias 0) → ``Reshape`` back, as PyTorch
    exports ``GroupNorm``, in channel order (see the module docstring)."""
    from onnx import helper

    before = graph.producer.get(node.input[0])
    after = graph.consumers.get(node.output[0], [])
    if before is None or before.op_type != "Reshape" or len(after) != 1 or after[0].op_type != "Reshape":
        return None
    (after_node,) = after
    x = before.input[0]
    shape, spatial = graph.shapes.get(x, []), graph.spatial(x)
    grouped = graph.constants.get(before.input[1])
    scale, shift = (graph.constants.get(n) for n in node.input[1:3])
    if (
        not spatial or grouped is None or scale is None or shift is None or grouped.shape != (3,)
        or grouped[2] != -1 or grouped[0] not in (0, shape[0]) or not 0 < grouped[1] <= shape[1]
        or shape[1] % int(grouped[1]) or not np.all(scale == 1) or not np.all(shift == 0)
        or len(graph.consumers.get(before.output[0], [])) != 1
    ):  # fmt: skip
        return None
    back = graph.producer.get(after_node.input[1])
    back_shape = graph.constants.get(after_node.input[1])
    if not (back is not None and back.op_type == "Shape" and back.input[0] == x and not _attributes(back)) and not (
        back_shape is not None and list(back_shape) == shape
    ):
        return None
    channels, per_group, rank = shape[1], shape[1] // int(grouped[1]), len(spatial)
    name = f"{node.name or node.output[0]}/channel_order"
    # (channels, channels, 1, ...): output channel c averages the channels of c's group
    group = np.kron(np.eye(channels // per_group), np.full((per_group, per_group), 1 / per_group))
    mean_of_group = graph.constant(f"{name}/group", group.astype(np.float32).reshape(channels, channels, *[1] * rank))
    epsilon = graph.constant(f"{name}/epsilon", np.array(_attributes(node).get("epsilon", 1e-5), np.float32))
    axes = list(range(2, 2 + rank))
    nodes = [
        helper.make_node("ReduceMean", [x], [f"{name}/channel_mean"], axes=axes, keepdims=1),
        helper.make_node("Conv", [f"{name}/channel_mean", mean_of_group], [f"{name}/mean"]),
        helper.make_node("Sub", [x, f"{name}/mean"], [f"{name}/centred"]),
        helper.make_node("Mul", [f"{name}/centred", f"{name}/centred"], [f"{name}/squares"]),
        helper.make_node("ReduceMean", [f"{name}/squares"], [f"{name}/channel_variance"], axes=axes, keepdims=1),
        helper.make_node("Conv", [f"{name}/channel_variance", mean_of_group], [f"{name}/variance"]),
        helper.make_node("Add", [f"{name}/variance", epsilon], [f"{name}/variance_epsilon"]),
        helper.make_node("Sqrt", [f"{name}/variance_epsilon"], [f"{name}/deviation"]),
        helper.make_node("Div", [f"{name}/centred", f"{name}/deviation"], [after_node.output[0]]),
    ]
    return {id(before): [], id(node): [], id(after_node): nodes}


REWRITES = {
    "ConvTranspose": (_transposed_convolution, "transposed convolutions as sub-pixel convolutions"),
    "InstanceNormalization": (_group_normalization, "group normalizations in channel order"),
}


def rewrite_graph(source: Path, target: Path, input_shape: tuple[int, ...]) -> list[str]:
    """Write ``source`` to ``target`` (atomically) with the rewrites of this module, for inputs of
    ``input_shape`` (``(batch, channels, *spatial)``; the batch stays dynamic), and say what was
    rewritten (e.g. ``["4 transposed convolutions as sub-pixel convolutions"]``); nothing is
    written when nothing is.

    Raises
    ------
    onnx.checker.ValidationError, onnx.shape_inference.InferenceError, OSError
        The graph does not load or is not valid ONNX (ONNX's own errors), or ``target`` cannot
        be written.
    """
    import onnx

    graph = _Graph(onnx.load(str(source)), input_shape)
    replaced: Replacement = {}
    done: dict[str, int] = {}
    for node in graph.model.graph.node:
        if node.op_type not in REWRITES or id(node) in replaced:
            continue
        rewrite, what = REWRITES[node.op_type]
        change = rewrite(node, graph)
        if change is not None and not replaced.keys() & change.keys():
            replaced.update(change)
            done[what] = done.get(what, 0) + 1
    if not done:
        return []
    nodes = [new for node in graph.model.graph.node for new in replaced.get(id(node), [node])]
    while True:  # what only the replaced nodes used (their weights, Shape and Constant nodes) goes
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.model.graph.output}
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    initializers = [i for i in graph.model.graph.initializer if i.name in used] + graph.added
    del graph.model.graph.node[:]
    graph.model.graph.node.extend(nodes)
    del graph.model.graph.initializer[:]
    graph.model.graph.initializer.extend(initializers)
    onnx.checker.check_model(graph.model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    onnx.save(graph.model, str(tmp))
    os.replace(tmp, target)
    return [f"{count} {what}" for what, count in done.items()]
