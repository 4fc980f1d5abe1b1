"""Run an algorithm in a child process, with a timeout, so a plugin cannot take the node down.

The child is forked from a ``forkserver`` that has numpy, SciPy, torch and the algorithm registry
imported already, so starting it costs milliseconds. The voxels travel through shared memory;
masks come back bit-packed through a pipe. A plugin that raises fails its job with the reason; one
that crashes, is killed by the kernel for memory, or outlives the timeout is killed and fails its
job; the receiver and the other studies go on.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
from multiprocessing import forkserver
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from algorithms.base import AlgorithmResult, Device, Segment, Volume
from node.errors import PluginError, SeriesRefused

_PRELOAD = ["numpy", "scipy.ndimage", "torch", "algorithms.registry", "algorithms.lung_ct_density"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)


def warm_up() -> None:
    """Start the forkserver (and its imports) now, so the first study does not wait for it."""
    forkserver.ensure_running()


def _child(
    conn: multiprocessing.connection.Connection, entry_point: str, shm_name: str, geometry: dict[str, Any]
) -> None:
    shm = SharedMemory(name=shm_name)
    try:
        voxels = np.ndarray(geometry.pop("shape"), dtype=np.float32, buffer=shm.buf)
        module, _, attribute = entry_point.partition(":")
        algorithm = getattr(importlib.import_module(module), attribute)()
        params = algorithm.Params.model_validate_json(geometry.pop("params_json"))
        device = geometry.pop("device")
        result = algorithm.run(Volume(voxels=voxels, **geometry), device, params)
        packed = [(s.label, np.packbits(s.mask), s.mask.shape, s.category, s.property_type) for s in result.segments]
        conn.send(("ok", (packed, list(result.measurements), dict(result.parameters))))
        del voxels
    except SeriesRefused as exc:
        conn.send(("refused", exc.reason))
    except BaseException as exc:  # the child's boundary: report, the parent decides
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        shm.close()
        conn.close()


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


def run_isolated(entry_point: str, volume: Volume, device: Device, params: Any, timeout_s: float) -> AlgorithmResult:
    """Run the algorithm ``entry_point`` (``module:attribute``) on ``volume`` in a child process.

    Raises
    ------
    SeriesRefused
        The algorithm declined the series.
    PluginError
        It raised, crashed, was killed (out of memory) or ran past ``timeout_s`` seconds.
    """
    voxels = np.ascontiguousarray(volume.voxels, dtype=np.float32)
    shm = SharedMemory(create=True, size=max(1, voxels.nbytes))
    receiver, sender = _context.Pipe(duplex=False)
    try:
        np.ndarray(voxels.shape, dtype=np.float32, buffer=shm.buf)[...] = voxels
        geometry = {
            "shape": voxels.shape, "spacing_mm": volume.spacing_mm, "affine": volume.affine,
            "modality": volume.modality, "slice_thickness_mm": volume.slice_thickness_mm,
            "device": device, "params_json": params.model_dump_json(),
        }  # fmt: skip
        process = _context.Process(target=_child, args=(sender, entry_point, shm.name, geometry), daemon=True)
        process.start()
        sender.close()
        kind, payload = _receive(process, receiver, timeout_s)
    finally:
        receiver.close()
        shm.close()
        shm.unlink()
    if kind == "refused":
        raise SeriesRefused(payload)
    if kind == "error":
        raise PluginError(f"algorithm raised {payload}")
    packed, measurements, parameters = payload
    segments = [
        Segment(label, np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool), category, kind_)
        for label, bits, shape, category, kind_ in packed
    ]
    return AlgorithmResult(segments=segments, measurements=measurements, parameters=parameters)
