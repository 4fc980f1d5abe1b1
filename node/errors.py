"""The one error hierarchy of ainode.

::

    AinodeError
    ├── ConfigError            invalid configuration (names file, line, key and what is wrong)
    ├── KeyProviderError       a key-encryption key cannot be loaded
    ├── StorageError           the encrypted store cannot read or write an object
    │   ├── TamperedObjectError    authentication of a stored object failed (tampered or truncated)
    │   ├── OutOfResourcesError    the disk watermark is reached; maps to DIMSE 0xA700   (transient)
    │   ├── IndexUnavailableError  the index database is locked or unreachable            (transient)
    │   └── IndexSchemaError       the index schema is older or newer than this release knows
    ├── InvalidInstanceError   a received data set is unusable; maps to DIMSE 0xA900 / 0xC000
    │   └── DataSetTooLargeError   over node.max_dataset_bytes (0xC000)
    ├── DeidentificationError  a data set cannot be de-identified or re-identified safely
    │   └── QuarantinedError       pixels may hold burned-in PHI and no rule cleans them
    ├── PluginError            an algorithm plugin failed to load or raised
    │   └── SeriesRefused          the series is declined with a reason (not a failure)
    ├── ResultBuildError       a SEG or SR cannot be built
    ├── DeliveryError          a destination refused or could not be reached           (transient)
    ├── LeaseLostError         another worker took over a job whose lease this one lost
    ├── ExecutorError          the job executor cannot reach its broker                 (transient)
    ├── NotFoundError          an administrator named a study, job or user that does not exist
    ├── ConflictError          an administrative action does not apply to the object as it stands
    └── ConsoleError           the console refused a request (HTTP 4xx at its edge)
        ├── AuthenticationError    no valid session, wrong user or password, or locked out (401)
        ├── AccessDeniedError      the user's role does not allow the action, or no CSRF token (403)
        └── RateLimitedError       too many sign-in attempts at once or from one address (429)

Errors are converted to DIMSE statuses only at the network edge (``node.network``). The plugin SDK
has its own small tree (:mod:`ainode_sdk.errors`); :class:`PluginError` and :class:`SeriesRefused`
are also SDK errors, so ``except ainode_sdk.errors.SeriesRefused`` catches a refusal from either side.

*Transient* errors (``transient = True``) are conditions that pass by themselves: planning and jobs
that meet one are retried with backoff. Every other error is permanent: the job or study fails with
the error's message as its reason.
"""

from __future__ import annotations

from ainode_sdk import errors as sdk


class AinodeError(Exception):
    """Root of every error ainode raises on purpose."""

    transient: bool = False
    """Whether the condition passes by itself (retry later) rather than needing a person."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (see the module docstring)."""
    return isinstance(exc, AinodeError) and exc.transient


class ConfigError(AinodeError):
    """The configuration is invalid; the message names the file, line, key and problem."""


class KeyProviderError(AinodeError):
    """A key-encryption key cannot be found, read or used."""


class StorageError(AinodeError):
    """The encrypted store cannot read or write an object."""


class TamperedObjectError(StorageError):
    """AES-GCM authentication of a stored object failed: it was altered or truncated."""


class OutOfResourcesError(StorageError):
    """Free disk space is below the configured watermark (DIMSE 0xA700, PS3.4 B.2.3)."""

    transient = True


class IndexUnavailableError(StorageError):
    """The index database is locked by another process or cannot be reached right now."""

    transient = True


class IndexSchemaError(StorageError):
    """The index database's schema revision is not this release's (``ainode db upgrade`` or a newer
    release is needed)."""


class InvalidInstanceError(AinodeError):
    """A received SOP instance is unusable (missing UIDs, not matching its SOP class)."""


class DataSetTooLargeError(InvalidInstanceError):
    """A received data set is over ``node.max_dataset_bytes`` (DIMSE 0xC000; it was not kept)."""


class DeidentificationError(AinodeError):
    """A data set cannot be de-identified or re-identified safely."""


class QuarantinedError(DeidentificationError):
    """An image may carry identifying text in its pixels and no pixel rule cleans it (PS3.15 E.3.1)."""


class PluginError(AinodeError, sdk.AlgorithmError):
    """An algorithm plugin failed to load or raised while running."""


class SeriesRefused(PluginError, sdk.SeriesRefused):
    """The node declines a series (e.g. its geometry cannot form a volume); ``reason`` says why.

    This is an expected outcome (no results are produced), not a failure of the node.
    """


class ResultBuildError(AinodeError):
    """A DICOM SEG or SR cannot be built from an algorithm's result."""


class DeliveryError(AinodeError):
    """A destination refused the results or could not be reached."""

    transient = True


class RetrieveError(AinodeError):
    """A source could not be queried or did not deliver what was asked (C-FIND, C-MOVE, C-GET,
    QIDO-RS, WADO-RS)."""

    transient = True


class LeaseLostError(AinodeError):
    """This worker's lease on a job expired and another worker took the job over (the ledger
    refused a fenced write); this worker stops working on it and writes nothing more."""


class ExecutorError(AinodeError):
    """The job executor cannot reach its broker (Celery over RabbitMQ or Redis)."""

    transient = True


class NotFoundError(AinodeError):
    """An administrator (CLI or console) named a study, job or user that does not exist (HTTP 404)."""


class ConflictError(AinodeError):
    """An administrative action does not apply to the object as it stands, e.g. retrying a job
    that is not a dead letter (HTTP 409)."""


class ConsoleError(AinodeError):
    """The console refused a request; converted to an HTTP status only at the console's edge."""


class AuthenticationError(ConsoleError):
    """No valid session, a wrong user name or password, or a locked account (HTTP 401).

    ``reason`` is a short code the login page turns into its own text (it never shows text
    taken from a URL): see :data:`node.console.web.LOGIN_REASONS`.
    """

    def __init__(self, message: str, reason: str = "signin") -> None:
        super().__init__(message)
        self.reason = reason


class AccessDeniedError(ConsoleError):
    """The signed-in user's role does not allow the action, or the form carried no valid CSRF
    token (HTTP 403)."""


class RateLimitedError(ConsoleError):
    """Too many sign-in attempts at once, or too many failures from one address or for one user
    name: refused before any password is verified (HTTP 429)."""
