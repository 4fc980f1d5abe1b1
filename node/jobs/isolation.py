"""Run an algorithm in a child process, with a timeout, so a plugin cannot take the node down.

The child is forked from a ``forkserver`` that has numpy, SciPy, torch and the algorithm registry
imported already, so starting it costs milliseconds. The voxels travel through shared memory;
masks come back bit-packed through a pipe. A plugin that raises fails its job with the reason; one
that crashes, is killed by the kernel for memory, or outlives the timeout is killed and fails its
job; the receiver and the other studies go on.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, wait
from multiprocessing import forkserver
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from ainode_sdk import errors as sdk
from ainode_sdk.base import AlgorithmResult, Device, Volume
from node.errors import PluginError, SeriesRefused
from node.jobs.devices import DeviceInfo

logger = logging.getLogger(__name__)

_PRELOAD = ["numpy", "scipy.ndimage", "torch", "ainode_sdk.registry", "lung_ct_density"]
PROCESS_CONTEXT = multiprocessing.get_context("forkserver")
"""Where algorithm and model processes come from (a forkserver with the heavy imports done)."""
PROCESS_CONTEXT.set_forkserver_preload(_PRELOAD)


def _device_child(conn: multiprocessing.connection.Connection) -> None:
    import torch

    from ainode_sdk.registry import select_device

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(DeviceInfo(f"cuda:{index}", int(total), int(free)))
    conn.send((select_device(), gpus))
    conn.close()


def probe_devices(timeout_s: float = 300.0) -> tuple[Device, list[DeviceInfo]]:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``, and each GPU's total and free memory
    (``torch.cuda.mem_get_info``), asked in a child of the forkserver (where torch is imported
    already), so that the node's own process never loads torch."""
    receiver, sender = PROCESS_CONTEXT.Pipe(duplex=False)
    process = PROCESS_CONTEXT.Process(target=_device_child, args=(sender,), daemon=True)
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout_s):
            device, gpus = receiver.recv()
            return device, gpus
    except EOFError:
        logger.warning("device probe died; running algorithms on cpu")
    finally:
        receiver.close()
        process.join(5)
    return "cpu", []


def warm_up() -> None:
    """Start the forkserver (and its imports) now, so the first study does not wait for it."""
    forkserver.ensure_running()


def _child(
    conn: multiprocessing.connection.Connection, entry_point: str, shm_name: str, geometry: dict[str, Any]
) -> None:
    shm = SharedMemory(name=shm_name)

    def run() -> Any:
        voxels = np.ndarray(geometry.pop("shape"), dtype=np.float32, buffer=shm.buf)
        module, _, attribute = entry_point.partition(":")
        algorithm = getattr(importlib.import_module(module), attribute)()
        params = algorithm.Params.model_validate_json(geometry.pop("params_json"))
        device = geometry.pop("device")
        return pack_result(algorithm.run(Volume(voxels=voxels, **geometry), device, params))

    try:
        send_outcome(conn, run)
    finally:
        shm.close()
        conn.close()


def send_outcome(conn: multiprocessing.connection.Connection, run: Callable[[], Any]) -> None:
    """Run ``run`` in a child process and send its outcome: ``("ok", value)``, ``("refused",
    reason)`` for a refused series, or ``("error", (message, traceback))`` for anything it raised."""
    try:
        conn.send(("ok", run()))
    except sdk.SeriesRefused as exc:
        conn.send(("refused", exc.reason))
    except BaseException as exc:  # the child's boundary: report, the parent decides
        conn.send(("error", (f"{type(exc).__name__}: {exc}", traceback.format_exc())))


def _receive(process: Any, receiver: multiprocessing.connection.Connection, timeout_s: float) -> tuple[str, Any]:
    try:
        if not receiver.poll(timeout_s):
            raise PluginError(f"algorithm ran past its timeout of {timeout_s:g} s and was stopped")
        try:
            return receiver.recv()
        except EOFError:
            process.join(5)
            raise PluginError(
                f"algorithm process died (exit code {process.exitcode}: crashed or killed for memory)"
            ) from None
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)


class SharedVolume:
    """Voxels in shared memory, so that a volume reaches the algorithm's process without a copy.

    Use as a context manager around loading the volume and :func:`run_isolated_packed`; ``allocate`` is
    the allocator :func:`node.jobs.volume.load_volume` fills. Leaving the context frees the memory
    (drop other references to the array first).
    """

    def __init__(self) -> None:
        self.shm: SharedMemory | None = None
        self.array: np.ndarray | None = None
        self._touched: Future[None] | None = None

    def prepare(self, shape: tuple[int, ...], executor: Executor) -> None:
        """Create the block for ``shape`` now and have ``executor`` touch its pages, so that the
        kernel's work of supplying them (about half of loading a 500-slice volume) is done on a core
        that is idle meanwhile (the de-identification runs on one); :meth:`allocate` of the same
        shape then returns it."""
        array = self.allocate(shape)
        self._touched = executor.submit(array.fill, 0.0)

    def allocate(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` (slices, rows, columns) in a new shared memory block (the
        prepared one, if it has that shape; one of another shape is released)."""
        if self._settle_touch():
            if self.array is not None and self.array.shape == tuple(shape):
                return self.array
            self._release()
        if self.shm is not None:
            raise PluginError("a SharedVolume holds one volume")
        self.shm = SharedMemory(create=True, size=max(1, int(np.prod(shape)) * 4))
        self.array = np.ndarray(shape, dtype=np.float32, buffer=self.shm.buf)
        return self.array

    def holds(self, voxels: np.ndarray) -> bool:
        """Whether ``voxels`` is this block's array."""
        return self.array is not None and voxels is self.array

    def __enter__(self) -> SharedVolume:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the block (what leaving the context does)."""
        self._settle_touch()  # prepared, never used: its pages touched, or never, before freeing
        self._release()

    def _settle_touch(self) -> bool:
        """End the prepared block's page touch: cancelled if not begun (its pool is busy; whoever
        writes the block touches the pages), else waited for. Whether the block was prepared."""
        touched, self._touched = self._touched, None
        if touched is not None and not touched.cancel():
            wait([touched])
        return touched is not None

    def _release(self) -> None:
        self.array = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:  # an array still refers to it: the mapping goes when that does
                logger.warning("shared volume still referenced when released")
            self.shm.unlink()
            self.shm = None


PackedResult = tuple[Any, ...]
"""An :class:`~ainode_sdk.base.AlgorithmResult` as :func:`pack_result` sends it between processes."""


def run_isolated_packed(
    entry_point: str,
    volume: Volume,
    device: Device,
    params: Any,
    timeout_s: float,
    shared: SharedVolume | None = None,
) -> PackedResult:
    """Run the algorithm ``entry_point`` (``module:attribute``) on ``volume`` in a child process;
    returns its result as the child sent it (:func:`pack_result`: masks bit-packed, one bit a voxel;
    :func:`unpack_result` gives the :class:`~ainode_sdk.base.AlgorithmResult`).

    ``shared``, when it holds ``volume.voxels``, hands them over without a copy; otherwise they
    are copied into a shared memory block for the duration of the call.

    Raises
    ------
    SeriesRefused
        The algorithm declined the series.
    PluginError
        It raised, crashed, was killed (out of memory) or ran past ``timeout_s`` seconds.
    """
    if shared is not None and shared.holds(volume.voxels):
        return _run_on_shared(entry_point, volume, device, params, timeout_s, shared)
    with SharedVolume() as own:
        own.allocate(volume.voxels.shape)[...] = volume.voxels
        return _run_on_shared(entry_point, volume, device, params, timeout_s, own)


def _run_on_shared(
    entry_point: str, volume: Volume, device: Device, params: Any, timeout_s: float, shared: SharedVolume
) -> PackedResult:
    """Run the child on the voxels in ``shared`` (``volume`` gives their geometry)."""
    if shared.shm is None:
        raise PluginError("no shared volume to run on")
    voxels = volume.voxels
    receiver, sender = PROCESS_CONTEXT.Pipe(duplex=False)
    try:
        geometry = {
            "shape": voxels.shape, "spacing_mm": volume.spacing_mm, "affine": volume.affine,
            "modality": volume.modality, "slice_thickness_mm": volume.slice_thickness_mm,
            "device": device, "params_json": params.model_dump_json(), "priors": volume.priors,
        }  # fmt: skip
        args = (sender, entry_point, shared.shm.name, geometry)
        process = PROCESS_CONTEXT.Process(target=_child, args=args, daemon=True)
        process.start()
        sender.close()
        kind, payload = _receive(process, receiver, timeout_s)
    finally:
        receiver.close()
    return tuple(answer(kind, payload, "algorithm", entry_point))


def answer(kind: str, payload: Any, what: str, name: str) -> Any:
    """The payload of an algorithm process's answer ``(kind, payload)``.

    Raises
    ------
    SeriesRefused
        The algorithm declined the series (``kind`` ``refused``).
    PluginError
        It raised (``kind`` ``error``); its traceback is logged — it only ever saw de-identified
        voxels, so it holds no PHI.
    """
    if kind == "refused":
        raise SeriesRefused(payload)
    if kind == "error":
        message, trace = payload
        logger.error("%s %s raised %s\n%s", what, name, message, trace)
        raise PluginError(f"{what} {name} raised {message}" if what == "model" else f"{what} raised {message}")
    return payload


def pack_result(result: AlgorithmResult) -> PackedResult:
    """A result as sent between processes: masks bit-packed, everything else as it is."""
    bare = [dataclasses.replace(s, mask=np.empty(0, dtype=bool)) for s in result.segments]
    bits = [(np.packbits(s.mask), s.mask.shape) for s in result.segments]
    return bare, bits, dataclasses.replace(result, segments=[])


_UNPACK_BYTES = 2**18
"""Packed bytes unpacked or counted at a time (2 Mi voxels; a whole slice at least): a mask is
unpacked straight into its block through one small temporary, not a whole-mask one (131 MB of
fresh pages at 500 slices)."""


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A segment's mask as :func:`pack_result` sent it, read a slab of slices at a time: only
    the slab asked for is unpacked (:class:`node.monitoring.describe.MaskSlabs`).

    Attributes
    ----------
    bits
        ``np.packbits`` of the ``bool`` mask in C order (the last byte padded with zeros).
    shape
        The mask's shape, ``(slices, rows, columns)``.
    """

    bits: np.ndarray
    shape: tuple[int, ...]

    def count(self) -> int:
        """How many voxels the mask holds (the bits set; the padding is zeros)."""
        return sum(
            int(np.bitwise_count(self.bits[start : start + _UNPACK_BYTES]).sum(dtype=np.int64))
            for start in range(0, self.bits.size, _UNPACK_BYTES)
        )

    def slab(self, first: int, stop: int) -> np.ndarray:
        """Slices ``first`` to ``stop`` (clipped to the mask), ``bool`` of shape
        ``(slices, rows, columns)``: the voxels of ``mask[first:stop]``."""
        per_slice = int(np.prod(self.shape[1:]))
        first, stop = min(first, self.shape[0]), min(stop, self.shape[0])
        begin, end = first * per_slice, stop * per_slice  # bit offsets into the packed mask
        covering = np.unpackbits(self.bits[begin // 8 : -(-end // 8)])
        offset = begin % 8
        return covering[offset : offset + end - begin].view(bool).reshape(stop - first, *self.shape[1:])

    def unpack_into(self, out: np.ndarray) -> None:
        """Unpack the whole mask into ``out`` (``bool``, of :attr:`shape`) a slab at a time: one
        small temporary (about :data:`_UNPACK_BYTES` packed), not a whole-mask one."""
        step = max(1, _UNPACK_BYTES * 8 // int(np.prod(self.shape[1:])))
        for first in range(0, self.shape[0], step):
            out[first : first + step] = self.slab(first, first + step)


def packed_masks(payload: PackedResult) -> Iterator[PackedMask]:
    """The segment masks of a packed result, each still packed and read a slab at a time (a
    summary of the segments never holds a whole mask unpacked: 131 MB of new memory per mask
    at 500 slices)."""
    for packed, shape in payload[1]:
        yield PackedMask(packed, tuple(int(n) for n in shape))


def unpack_result(payload: PackedResult) -> AlgorithmResult:
    """What :func:`pack_result` packed; masks of one shape come back as views of one segment-major
    block (what the SEG build uses without another copy)."""
    bare, _bits, rest = payload
    readers = list(packed_masks(payload))
    shapes = {reader.shape for reader in readers}
    if len(shapes) == 1:  # the usual case: one segment-major block, each mask a view of it
        (shape,) = shapes
        block = np.empty((len(readers), *shape), dtype=bool)
        for reader, into in zip(readers, block, strict=True):
            reader.unpack_into(into)
        masks = list(block)
    else:
        masks = [reader.slab(0, reader.shape[0]) for reader in readers]
    segments = [dataclasses.replace(s, mask=m) for s, m in zip(bare, masks, strict=True)]
    return dataclasses.replace(rest, segments=segments)
