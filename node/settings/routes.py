"""Configuration models of routing (pydantic v2, ``extra="forbid"``, frozen): the routes of
``ainode.yaml``, their algorithms with canaries and shadows, their priors and when a study is
complete; loaded with the rest of the file by :mod:`node.settings.config`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from node.conditions import CONDITION_JSON_SCHEMA, All, AnyOf, Condition, Not, Test, parse_condition


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def condition_of(value: Any) -> Condition:
    """A rule's condition from its YAML value (a parsed condition is returned as it is).

    Raises
    ------
    node.conditions.RuleSyntaxError
        The value is not a valid condition.
    """
    if isinstance(value, Test | All | AnyOf | Not):
        return value
    return parse_condition(value)


class Completion(_Model):
    """When a study counts as complete.

    No new instance for ``quiet_period_s`` seconds and, when ``expected_series`` is given, at least
    one series of the study matching it; but at the latest ``max_wait_s`` after its first instance
    (a study still trickling in, or one whose expected series never comes, is analysed anyway).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    quiet_period_s: Annotated[float, Field(gt=0)] = 60.0
    max_wait_s: Annotated[float, Field(gt=0)] | None = None
    expected_series: Annotated[
        Condition | None,
        BeforeValidator(lambda v: None if v is None else condition_of(v)),
        WithJsonSchema(CONDITION_JSON_SCHEMA),
    ] = None


class Canary(_Model):
    """A new version rolled out to part of a route's studies: ``algorithm`` (another declared model
    or plugin) serves ``share`` of them, chosen by a keyed hash of the study key (the same studies
    after a restart and on every worker); the rest keep the route's algorithm."""

    algorithm: str
    share: Annotated[float, Field(gt=0, le=1)]
    parameters: dict[str, Any] = {}


class AlgorithmRef(_Model):
    """An algorithm of a route with the parameters it runs with (checked against its ``Params``),
    and optionally a canary of a new version."""

    name: str
    parameters: dict[str, Any] = {}
    canary: Canary | None = None


class Shadow(_Model):
    """An algorithm in a silent trial on a route: it runs on the same series as the live ones, its
    results are built and kept (sent only to research destinations), and each is compared with the
    results of ``against`` (one of the route's live algorithms; default: the first) — per segment
    Dice, volume difference and the difference of each measurement. Segments are paired by label;
    ``segments`` pairs a shadow segment with the union of several of the reference's
    (``{Lung: [Left lung, Right lung]}``)."""

    algorithm: str
    parameters: dict[str, Any] = {}
    against: str | None = None
    segments: dict[str, list[str]] = {}


def _algorithm_ref(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Priors(_Model):
    """The patient's earlier studies a route's algorithms get beside the current one: up to
    ``count`` of them, the most recent first, no older than ``max_age_days``, of the current
    series' modality, fetched from ``source`` (C-GET or WADO-RS: into the job, not stored as
    studies) and de-identified with the same patient pseudonym and date offset."""

    source: str
    count: Annotated[int, Field(ge=1, le=5)] = 1
    max_age_days: Annotated[int, Field(ge=1)] = 1825


class Route(_Model):
    """A routing rule: when ``match`` holds, run ``algorithms`` and send results to ``destinations``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    level: Literal["series", "study"] = "series"
    match: Annotated[Condition, BeforeValidator(condition_of), WithJsonSchema(CONDITION_JSON_SCHEMA)]
    algorithms: list[Annotated[AlgorithmRef, BeforeValidator(_algorithm_ref)]] = []
    shadow: list[Shadow] = Field(default=[], description="algorithms in a silent trial beside the live ones")
    priors: Priors | None = None
    destinations: list[str] = []
    completion: Completion = Completion()
    deidentification: str = "default"
    priority: Literal["stat", "routine", "background"] = "routine"

    @model_validator(mode="after")
    def _check_roles(self) -> Route:
        live = [a.name for a in self.algorithms]
        canaries = [a.canary.algorithm for a in self.algorithms if a.canary is not None]
        for i, shadow in enumerate(self.shadow):
            if shadow.algorithm in live or shadow.algorithm in canaries:
                raise ValueError(f"shadow[{i}].algorithm: {shadow.algorithm!r} already serves this route")
            if shadow.against is not None and shadow.against not in live:
                raise ValueError(f"shadow[{i}].against: {shadow.against!r} is not a live algorithm of this route")
            if shadow.against is None and not live:
                raise ValueError(f"shadow[{i}]: a shadow needs a live algorithm on its route to be compared with")
        named = [s.algorithm for s in self.shadow]
        if len(set(named)) != len(named):
            raise ValueError("shadow: an algorithm is listed twice")
        return self

    def reference_of(self, shadow: Shadow) -> str:
        """The live algorithm a shadow's results are compared with."""
        return shadow.against or self.algorithms[0].name


class Routing(_Model):
    """Whether the first matching route wins or every matching route applies."""

    mode: Literal["first_match", "all_matches"] = "first_match"
