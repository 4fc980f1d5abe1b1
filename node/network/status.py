"""DIMSE status codes used at the network edge (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

import enum

from node.errors import AinodeError, InvalidInstanceError, OutOfResourcesError


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def status_for(error: BaseException) -> StoreStatus:
    """The C-STORE status that answers ``error``."""
    if isinstance(error, OutOfResourcesError):
        return StoreStatus.OUT_OF_RESOURCES
    if isinstance(error, InvalidInstanceError):
        return StoreStatus.CANNOT_UNDERSTAND
    if isinstance(error, AinodeError):
        return StoreStatus.OUT_OF_RESOURCES
    return StoreStatus.PROCESSING_FAILURE
