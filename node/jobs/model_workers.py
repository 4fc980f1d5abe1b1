"""The model worker: a long-lived process per device that keeps declared models loaded.

A declared model (:mod:`ainode_sdk.declared`) is loaded once in its device's worker and reused for the
next study; it is loaded again when its weights file changes. The worker is a child of the same
forkserver as the algorithm processes and is supervised like them: a model that raises fails its
job with the reason (its traceback goes to the node's log); one that crashes the worker, is killed
for memory or outlives the timeout fails its job, and the worker is started again for the next
study. The voxels arrive through shared memory; masks come back as a label map. After each run the
worker writes what it holds to ``DATA_DIR/run/models-<device>.json`` (``ainode algorithms list``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing.connection
import os
import threading
from functools import partial
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from ainode_sdk.base import Volume
from node.errors import PluginError
from node.jobs.isolation import PROCESS_CONTEXT, PackedResult, SharedVolume, answer, pack_result, send_outcome

logger = logging.getLogger(__name__)


def _worker_main(conn: multiprocessing.connection.Connection, device: str, status_path: str) -> None:
    """The worker's loop: ``("run", name, declaration_json, shm_name, geometry)`` -> result."""
    from ainode_sdk.declared.model import CACHE

    # compiled networks (runtime: onnxruntime | openvino | auto) are kept beside the status file
    os.environ.setdefault("AINODE_MODEL_CACHE", str(Path(status_path).parent / "compiled"))
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(device.split(":")[1]))
    run_on = "cuda" if device.startswith("cuda") else "cpu"
    models: dict[tuple[str, str], Any] = {}
    _write_status(Path(status_path), device, {})
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "status":
            conn.send(("status", CACHE.status()))
            continue
        _kind, name, declaration_json, shm_name, geometry = message
        shm = SharedMemory(name=shm_name)
        try:
            send_outcome(conn, partial(_run_one, models, name, declaration_json, shm, geometry, run_on))
        finally:
            shm.close()
        _write_status(Path(status_path), device, CACHE.status())


def _run_one(
    models: dict[tuple[str, str], Any], name: str, declaration_json: str, shm: SharedMemory, geometry: dict[str, Any],
    run_on: str,
) -> Any:  # fmt: skip
    """One run in the worker: the declared model (made once per declaration) on the shared voxels."""
    from ainode_sdk.declared.model import CACHE, DeclaredModel
    from ainode_sdk.declared.spec import ModelDeclaration

    voxels = np.ndarray(geometry.pop("shape"), dtype=np.float32, buffer=shm.buf)
    key = (name, declaration_json)
    if key not in models:
        for other in [k for k in models if k[0] == name]:
            del models[other]
        models[key] = DeclaredModel(name, ModelDeclaration.model_validate_json(declaration_json))
    model = models[key]
    result = model.run(Volume(voxels=voxels, **geometry), run_on)
    return pack_result(result), model.last_timings, dict(CACHE.loads)


def _write_status(path: Path, device: str, models: dict[str, Any]) -> None:
    status: dict[str, Any] = {"pid": os.getpid(), "device": device, "models": models}
    if device.startswith("cuda:"):  # what this worker's torch holds on its GPU
        import torch

        status["gpu_memory_bytes"] = int(torch.cuda.memory_reserved(device))
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def read_status(run_dir: Path) -> list[dict[str, Any]]:
    """What each device's model worker last wrote (``models-<device>.json``): ``pid``, ``device``,
    ``models`` (per model: device, memory_bytes, load_s, loads, ...) and, on a GPU,
    ``gpu_memory_bytes`` (reserved by its torch). A file being rewritten is skipped."""
    out = []
    for path in sorted(run_dir.glob("models-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


class ModelWorker:
    """The node's side of one device's model worker (started on first use, restarted after a crash).

    Parameters
    ----------
    device
        ``cpu`` or ``cuda:N``.
    run_dir
        Where the worker writes its status (``models-<device>.json``).
    """

    def __init__(self, device: str, run_dir: Path) -> None:
        self.device = device
        self.status_path = run_dir / f"models-{device.replace(':', '')}.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> multiprocessing.connection.Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._discard()
        parent, child = PROCESS_CONTEXT.Pipe(duplex=True)
        self._process = PROCESS_CONTEXT.Process(
            target=_worker_main, args=(child, self.device, str(self.status_path)), name=f"ainode-models-{self.device}",
            daemon=True,
        )  # fmt: skip
        self._process.start()
        child.close()
        self._conn = parent
        logger.info("model worker started", extra={"device": self.device, "pid": self._process.pid})
        return parent

    def _discard(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def run_packed(
        self, name: str, declaration_json: str, volume: Volume, shared: SharedVolume, timeout_s: float
    ) -> tuple[PackedResult, dict[str, float], dict[str, int]]:
        """Run the declared model ``name`` on ``volume`` (whose voxels are in ``shared``); the
        result as the worker sent it (:func:`~node.jobs.isolation.pack_result`: masks bit-packed).

        Returns
        -------
        tuple
            The result, seconds per stage (load, pre-processing, inference, post-processing,
            measurement), and the worker's count of loads per model.

        Raises
        ------
        SeriesRefused
            The model declines the series.
        PluginError
            It raised, crashed the worker, or ran past ``timeout_s`` (the worker is restarted).
        """
        if shared.shm is None or not shared.holds(volume.voxels):
            raise PluginError("the volume must be in shared memory")
        geometry = {
            "shape": volume.voxels.shape, "spacing_mm": volume.spacing_mm, "affine": volume.affine,
            "modality": volume.modality, "slice_thickness_mm": volume.slice_thickness_mm,
        }  # fmt: skip
        with self._lock:
            conn = self._ensure()
            conn.send(("run", name, declaration_json, shared.shm.name, geometry))
            try:
                if not conn.poll(timeout_s):
                    self._discard()
                    raise PluginError(f"model {name} ran past its timeout of {timeout_s:g} s; its worker was stopped")
                kind, payload = conn.recv()
            except (EOFError, OSError):
                code = self._process.exitcode if self._process is not None else None
                self._discard()
                raise PluginError(f"model worker died (exit code {code}: crashed or killed for memory)") from None
        packed, timings, loads = answer(kind, payload, "model", name)
        return packed, timings, loads

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """What the worker holds now (``{}`` when it is not running)."""
        with self._lock:
            if self._process is None or not self._process.is_alive() or self._conn is None:
                return {}
            self._conn.send(("status",))
            if not self._conn.poll(timeout_s):
                return {}
            _kind, payload = self._conn.recv()
            return dict(payload)

    def stop(self) -> None:
        """Stop the worker (its models are unloaded)."""
        with self._lock:
            self._discard()


class ModelWorkers:
    """One :class:`ModelWorker` per device, made on first use."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._workers: dict[str, ModelWorker] = {}
        self._lock = threading.Lock()

    def on(self, device: str) -> ModelWorker:
        """The worker of ``device``."""
        with self._lock:
            if device not in self._workers:
                self._workers[device] = ModelWorker(device, self.run_dir)
            return self._workers[device]

    def stop(self) -> None:
        """Stop every worker."""
        for worker in list(self._workers.values()):
            worker.stop()
