"""What identifies every result object ainode builds (the General Series, SOP Common and General
Equipment attributes highdicom's constructors take), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ainode_sdk.base import AlgorithmSpec

MANUFACTURER = "ainode"


@dataclass(frozen=True)
class ObjectIdentity:
    """A result object's series and SOP instance (the only instance of its series) and the device
    that made it (the node's AE title as Device Serial Number, when given)."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    device_serial_number: str | None = None

    def kwargs(self, spec: AlgorithmSpec | None = None) -> dict[str, Any]:
        """The keyword arguments of a highdicom constructor; with ``spec``, the algorithm as
        Manufacturer's Model Name and Software Versions."""
        identity: dict[str, Any] = {
            "series_instance_uid": self.series_instance_uid, "series_number": self.series_number,
            "sop_instance_uid": self.sop_instance_uid, "instance_number": 1, "manufacturer": MANUFACTURER,
        }  # fmt: skip
        if spec is not None:
            identity |= {"manufacturer_model_name": spec.name, "software_versions": spec.version}
        if self.device_serial_number is not None:
            identity["device_serial_number"] = self.device_serial_number
        return identity
