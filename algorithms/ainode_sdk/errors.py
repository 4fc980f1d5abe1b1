"""The plugin SDK's own errors (algorithms never import ``node``; the node converts these).

::

    AlgorithmError          root of the SDK's errors
    ├── SeriesRefused       the algorithm declines a series it cannot measure (not a failure)
    ├── PluginLoadError     a plugin or declared model cannot be found, loaded or built
    └── ModelError          a declared model's weights, labels or output are unusable
"""

from __future__ import annotations


class AlgorithmError(Exception):
    """Root of the errors raised by the plugin SDK and by algorithms."""


class SeriesRefused(AlgorithmError):
    """An algorithm declines a series it cannot measure; ``reason`` says why (no results, no failure)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PluginLoadError(AlgorithmError):
    """A plugin or a declared model cannot be found, imported or built."""


class ModelError(AlgorithmError):
    """A declared model's weights, label table or output do not fit what it declares."""
