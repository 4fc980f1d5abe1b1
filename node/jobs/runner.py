"""Running one algorithm on one volume — the single way both the analyse stage and
``ainode algorithms check`` do it (:func:`run_algorithm`).

A Python plugin runs in an isolated process of its own (:mod:`node.jobs.isolation`); a declared
model runs in the model worker of the device it is placed on (:mod:`node.jobs.model_workers`, placement
by :class:`node.jobs.devices.DevicePool`, or the CPU when there is no pool). The volume travels
in shared memory; the result comes back as the process sent it (masks bit-packed), with the
seconds it took.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from pydantic import ValidationError

from ainode_sdk.base import Device, Volume, check_accepts
from ainode_sdk.registry import Registry
from node.errors import PluginError
from node.jobs.devices import DevicePool
from node.jobs.isolation import PackedResult, SharedVolume, run_isolated_packed
from node.jobs.model_workers import ModelWorkers

logger = logging.getLogger(__name__)


def algorithm_params(registry: Registry, name: str, parameters: Mapping[str, Any], where: str) -> Any:
    """The algorithm ``name``'s ``Params`` model filled from ``parameters``.

    Raises
    ------
    PluginError
        They do not fit (the message names ``where`` they come from, e.g. the route).
    """
    try:
        return registry.get(name).Params.model_validate(dict(parameters))
    except ValidationError as exc:
        raise PluginError(f"parameters of {name} in {where}: {exc.errors()[0]['msg']}") from None


def run_algorithm(
    registry: Registry, name: str, params: Any, volume: Volume, shared: SharedVolume, models: ModelWorkers, *,
    device: Device = "cpu", devices: DevicePool | None = None, priority: str = "routine", timeout_s: float = 3600.0,
) -> tuple[PackedResult, dict[str, float]]:  # fmt: skip
    """Run the algorithm ``name`` on ``volume`` (its voxels in ``shared``).

    Parameters
    ----------
    params
        Its parameters (:func:`algorithm_params`); a declared model takes none.
    models
        The model workers a declared model runs in.
    device
        Where a Python plugin runs, and a declared model when there is no ``devices`` pool.
    devices
        Places a declared model on a device with room for it (by its declared resources).

    Returns
    -------
    tuple
        The packed result and the seconds of its steps (``model_*`` for a declared model).

    Raises
    ------
    SeriesRefused
        The algorithm does not accept the series (its spec) or declines it.
    PluginError
        It failed, ran out of time, or cannot be placed.
    """
    check_accepts(registry.get(name).spec, volume)
    declared = registry.declaration(name)
    if declared is None:
        entry_point = registry.entry_point(name)
        return run_isolated_packed(entry_point, volume, device, params, timeout_s, shared), {}
    res = declared.resources
    place: AbstractContextManager[str] = (
        devices.place(name, res.gpu, res.gpu_memory_gib, res.cpu_fallback, priority)
        if devices is not None else nullcontext(device)
    )  # fmt: skip
    with place as where:
        packed, timings, loads = models.on(where).run_packed(
            name, declared.model_dump_json(), volume, shared, timeout_s
        )
    seconds = {f"model_{k}": v for k, v in timings.items()}
    seconds["model_loads"] = float(loads.get(name, 0))
    logger.info("model ran", extra={"algorithm": name, "device": where, **{k: round(v, 3) for k, v in timings.items()}})
    return packed, seconds
