"""GPU placement of declared models: each job goes to a device with room for the model's declared
GPU memory, or waits for one (stat jobs first).

The inventory comes from torch's ``cuda.mem_get_info`` per device (asked in a child process, so the
node never loads torch). Reservations are the models' declared needs, not measurements, so two
models whose needs together exceed a device's free memory never run on it at the same time. A
``gpu: required`` model never runs on the CPU (on a node without CUDA its job fails at once with the
reason); an ``optional`` one runs on the CPU when no GPU has room, if its declaration allows it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from node.errors import PluginError

PRIORITY_RANK = {"stat": 0, "routine": 1, "background": 2}
GIB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as probed: ``cuda:N``, its total and free memory (bytes)."""

    name: str
    total_bytes: int
    free_bytes: int


class DevicePool:
    """Reservations of GPU memory by running models (see the module docstring).

    Parameters
    ----------
    gpus
        The node's GPUs (empty on a CPU-only node).
    """

    def __init__(self, gpus: list[DeviceInfo]) -> None:
        self.gpus = list(gpus)
        self._reserved = {g.name: 0 for g in self.gpus}
        self._cond = threading.Condition()
        self._waiting: dict[int, int] = {}  # ticket -> priority rank
        self._tickets = itertools.count()

    def _fitting(self, need: int) -> str | None:
        for gpu in sorted(self.gpus, key=lambda g: self._reserved[g.name]):
            if gpu.free_bytes - self._reserved[gpu.name] >= need:
                return gpu.name
        return None

    @contextmanager
    def place(
        self, model: str, gpu: str, need_gib: float, cpu_fallback: bool, priority: str = "routine",
        timeout_s: float = 3600.0,
    ) -> Iterator[str]:  # fmt: skip
        """Hold a device for one run of ``model``; yields ``cuda:N`` or ``cpu``.

        Raises
        ------
        PluginError
            ``gpu: required`` on a node without a GPU, a need larger than any GPU, or no room
            within ``timeout_s`` (permanent: the reason is the job's).
        """
        need = int(need_gib * GIB)
        if gpu == "none":
            yield "cpu"
            return
        if not self.gpus:
            if gpu == "required":
                raise PluginError(f"model {model} needs a GPU (gpu: required); this node has none (no CUDA device)")
            yield "cpu"
            return
        if need > max(g.free_bytes for g in self.gpus):
            if gpu == "required" or not cpu_fallback:
                raise PluginError(f"model {model} declares {need_gib:g} GiB of GPU memory; no GPU has that much free")
            yield "cpu"
            return
        device = self._acquire(model, gpu, need, cpu_fallback, PRIORITY_RANK.get(priority, 1), timeout_s)
        try:
            yield device
        finally:
            if device != "cpu":
                with self._cond:
                    self._reserved[device] -= need
                    self._cond.notify_all()

    def _acquire(self, model: str, gpu: str, need: int, cpu_fallback: bool, rank: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            ticket = next(self._tickets)
            self._waiting[ticket] = rank
            try:
                while True:
                    ahead = any(r < rank for t, r in self._waiting.items() if t != ticket)
                    device = None if ahead else self._fitting(need)
                    if device is not None:
                        self._reserved[device] += need
                        return device
                    if gpu == "optional" and cpu_fallback and not ahead:
                        return "cpu"
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PluginError(f"model {model}: no GPU had room within {timeout_s:g} s")
                    self._cond.wait(min(remaining, 1.0))
            finally:
                del self._waiting[ticket]
                self._cond.notify_all()

    def reserved_gib(self) -> dict[str, float]:
        """GiB reserved per GPU now."""
        with self._cond:
            return {name: n / GIB for name, n in self._reserved.items()}
