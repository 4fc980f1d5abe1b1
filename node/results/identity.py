"""What identifies every result object ainode builds (the General Series, SOP Common and General
Equipment attributes highdicom's constructors take), in one place."""

from __future__ import annotations

from typing import Any

from ainode_sdk.base import AlgorithmSpec

MANUFACTURER = "ainode"


def object_identity(
    series_instance_uid: str, sop_instance_uid: str, series_number: int, spec: AlgorithmSpec | None = None,
    device_serial_number: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments that identify a result object: its series and SOP instance (the
    only instance of its series), the manufacturer and, for an algorithm's object, the algorithm
    as model name and software version, the node (its AE title) as device serial number."""
    identity: dict[str, Any] = {
        "series_instance_uid": series_instance_uid, "series_number": series_number,
        "sop_instance_uid": sop_instance_uid, "instance_number": 1, "manufacturer": MANUFACTURER,
    }  # fmt: skip
    if spec is not None:
        identity |= {"manufacturer_model_name": spec.name, "software_versions": spec.version}
    if device_serial_number is not None:
        identity["device_serial_number"] = device_serial_number
    return identity
