"""Canary roll-out of a new algorithm version: which algorithm serves a study (``canary:`` on a
route's algorithm, :class:`node.settings.routes.Canary`).

The choice is a keyed hash of the study key — HMAC-SHA256 under the node's own ``canary`` secret
(:class:`node.storage.secrets.NodeSecrets`, shared by every process of the node) over the route,
the algorithm and the study key, read as a number in [0, 1) — so the same studies go to the new
version after a restart and on every worker, and nobody outside the node can steer a study into
(or out of) the canary. The job records the algorithm that served it.
"""

from __future__ import annotations

import hashlib
import hmac

from node.settings.config import Settings
from node.settings.routes import AlgorithmRef

CANARY_SECRET = "canary"


def canary_point(key: bytes, study_key: str, route: str, algorithm: str) -> float:
    """Where the study falls in [0, 1) for the canary of ``algorithm`` on ``route``."""
    digest = hmac.new(key, f"{route}\0{algorithm}\0{study_key}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def serving(key: bytes, study_key: str, route: str, ref: AlgorithmRef) -> str:
    """The algorithm that serves ``study_key``: the canary's when the study falls in its share,
    else the route's own."""
    if ref.canary is not None and canary_point(key, study_key, route, ref.name) < ref.canary.share:
        return ref.canary.algorithm
    return ref.name


def algorithm_roles(settings: Settings) -> dict[str, list[str]]:
    """For each algorithm, how routes use it: ``"route R: live"``, ``"route R: canary 25 %
    (of A)"`` for a new version rolled out beside the live ``A``, or ``"route R: shadow (against
    A)"`` for one in a silent trial."""
    roles: dict[str, list[str]] = {}
    for route in settings.routes:
        for ref in route.algorithms:
            roles.setdefault(ref.name, []).append(f"route {route.name}: live")
            if ref.canary is not None:
                share = f"{ref.canary.share * 100:g} %"
                roles.setdefault(ref.canary.algorithm, []).append(f"route {route.name}: canary {share} (of {ref.name})")
        for shadow in route.shadow:
            roles.setdefault(shadow.algorithm, []).append(
                f"route {route.name}: shadow (against {route.reference_of(shadow)})"
            )
    return roles
