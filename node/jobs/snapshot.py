"""What a job was planned with: its route's snapshot, recorded in the ledger at planning.

A configuration reload between planning and running must not change planned work, so each job
stores the parts of the configuration it runs by — the algorithm and its parameters, the
de-identification profile, the destinations and what they receive, the priority — as JSON, next
to the SHA-256 of the configuration file (``jobs.config_digest``). Only the network addresses of
peers (where a destination's AE listens) are taken from the configuration in force when the job
delivers: they say where, not what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from node.errors import ConfigError
from node.settings.config import Deidentification, Destination, ResultKind, Settings
from node.settings.routes import Priors, Route

_DESTINATION: TypeAdapter[Any] = TypeAdapter(Destination)


@dataclass(frozen=True)
class JobPlan:
    """The route of one job as planned.

    Attributes
    ----------
    route, algorithm
        Names of the route and of the algorithm (plugin or declared model) it runs.
    parameters
        The algorithm's parameters from the route.
    priority
        ``stat``, ``routine`` or ``background``.
    deidentification
        The de-identification profile (PS3.15 Annex E options) the series is de-identified with.
    destinations
        Destination name -> its definition (type, peer or folder, result objects): the route's
        clinical destinations for a live or canary job, its research ones for a shadow.
    priors
        The patient's earlier studies the algorithm gets (:class:`node.settings.routes.Priors`).
    role
        ``live``, ``canary`` (a new version serving part of the route) or ``shadow`` (a silent
        trial, compared with the live algorithm ``against``; ``segments`` pairs its segments
        with the reference's, see :class:`node.settings.routes.Shadow`).
    """

    route: str
    algorithm: str
    parameters: dict[str, Any]
    priority: str
    deidentification: Deidentification
    destinations: dict[str, Any]
    role: str = "live"
    against: str | None = None
    segments: dict[str, list[str]] = field(default_factory=dict)
    priors: Priors | None = None

    @classmethod
    def of(cls, settings: Settings, route: Route, algorithm: str) -> JobPlan:
        """The plan of ``algorithm`` of ``route`` under ``settings`` (its role on the route decides
        its destinations)."""
        ref = next((a for a in route.algorithms if a.name == algorithm), None)
        canary = next((a.canary for a in route.algorithms if a.canary and a.canary.algorithm == algorithm), None)
        shadow = next((s for s in route.shadow if s.algorithm == algorithm), None)
        parameters = ref.parameters if ref is not None else canary.parameters if canary is not None else {}
        role = "live" if ref is not None else "canary" if canary is not None else "shadow" if shadow else "live"
        if shadow is not None and ref is None and canary is None:
            parameters = shadow.parameters
        research = role == "shadow"
        return cls(
            route=route.name,
            algorithm=algorithm,
            parameters=dict(parameters),
            priority=route.priority,
            deidentification=settings.deidentification[route.deidentification],
            destinations={
                name: settings.destinations[name]
                for name in route.destinations
                if settings.destinations[name].research == research
            },
            role=role,
            against=route.reference_of(shadow) if role == "shadow" and shadow is not None else None,
            segments=dict(shadow.segments) if role == "shadow" and shadow is not None else {},
            priors=route.priors,
        )

    def to_json(self) -> str:
        """The snapshot as stored in ``jobs.route_snapshot``."""
        return json.dumps(
            {
                "route": self.route,
                "algorithm": self.algorithm,
                "parameters": self.parameters,
                "priority": self.priority,
                "deidentification": self.deidentification.model_dump(mode="json"),
                # a list: the route's order of destinations is the order of delivery
                "destinations": [[n, _DESTINATION.dump_python(d, mode="json")] for n, d in self.destinations.items()],
                "role": self.role,
                "against": self.against,
                "segments": self.segments,
                "priors": self.priors.model_dump(mode="json") if self.priors else None,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> JobPlan:
        """A stored snapshot.

        Raises
        ------
        ConfigError
            The snapshot does not parse (written by an incompatible release).
        """
        try:
            data = json.loads(text)
            return cls(
                route=data["route"],
                algorithm=data["algorithm"],
                parameters=data["parameters"],
                priority=data["priority"],
                deidentification=Deidentification.model_validate(data["deidentification"]),
                destinations={n: _DESTINATION.validate_python(d) for n, d in data["destinations"]},
                role=data.get("role", "live"),
                against=data.get("against"),
                segments=data.get("segments") or {},
                priors=Priors.model_validate(data["priors"]) if data.get("priors") else None,
            )
        except (ValueError, KeyError, ValidationError) as exc:
            raise ConfigError(f"the job's route snapshot cannot be read: {exc}") from None

    @classmethod
    def current(cls, settings: Settings, route_name: str, algorithm: str) -> JobPlan:
        """The plan of a job from a release that stored no snapshot: its route as configured now.

        Raises
        ------
        ConfigError
            The route is no longer configured (permanent: retrying cannot bring it back).
        """
        route = next((r for r in settings.routes if r.name == route_name), None)
        if route is None:
            raise ConfigError(f"route {route_name!r} is no longer configured")
        return cls.of(settings, route, algorithm)

    def result_kinds(self) -> set[ResultKind]:
        """The kinds of result object the plan's destinations receive (SEG and SR when none is
        named; a shadow's always include the SEG its comparison reads)."""
        kinds: set[ResultKind] = set().union(*(d.result_kinds() for d in self.destinations.values()))
        kinds = kinds or {"SEG", "SR"}
        return kinds | {"SEG"} if self.role == "shadow" else kinds

    def settings_for_delivery(self, settings: Settings) -> Settings:
        """``settings`` with this plan's destinations (peers, their addresses and TLS as now).

        Raises
        ------
        ConfigError
            A DICOM destination's peer is no longer configured.
        """
        titles = {p.ae_title for p in settings.peers}
        for name, dest in self.destinations.items():
            peer = getattr(dest, "peer", None)
            if peer is not None and peer not in titles:
                raise ConfigError(f"destination {name!r}: peer {peer!r} is no longer configured")
        return settings.model_copy(update={"destinations": {**settings.destinations, **self.destinations}})
