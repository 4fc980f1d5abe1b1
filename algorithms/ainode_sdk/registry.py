"""The algorithm registry: plugins discovered through the entry-point group ``ainode.algorithms``.

Each entry point names a class (or factory) that returns an object satisfying
:class:`ainode_sdk.base.Algorithm`. A plugin that fails to import is logged and skipped, so one
broken plugin never stops the node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from ainode_sdk.base import Algorithm, AlgorithmSpec, Device
from ainode_sdk.errors import PluginLoadError

if TYPE_CHECKING:
    from ainode_sdk.declared.model import DeclaredModel
    from ainode_sdk.declared.spec import ModelDeclaration

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ainode.algorithms"


def select_device() -> Device:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    try:
        import torch
    except ImportError:  # torch is a dependency; a broken install still runs on CPU
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Registry:
    """Algorithms by name.

    Parameters
    ----------
    entry_points_
        Entry points to load; by default those of the group ``ainode.algorithms``.
    """

    def __init__(
        self, entry_points_: Iterable[EntryPoint] | None = None, models: Mapping[str, ModelDeclaration] | None = None
    ) -> None:
        self._entry_points = {
            ep.name: ep
            for ep in (entry_points_ if entry_points_ is not None else entry_points(group=ENTRY_POINT_GROUP))
        }
        self._loaded: dict[str, Algorithm] = {}
        self._models: dict[str, ModelDeclaration] = {}
        self._declared: dict[str, DeclaredModel] = {}
        self.set_models(models or {})

    def set_models(self, models: Mapping[str, ModelDeclaration]) -> None:
        """Replace the declared models (configuration load or reload).

        Raises
        ------
        PluginLoadError
            A model has the name of a Python plugin.
        """
        taken = sorted(set(models) & set(self._entry_points))
        if taken:
            raise PluginLoadError(f"models.{taken[0]}: the name is taken by a Python plugin")
        self._models = dict(models)
        self._declared = {n: m for n, m in self._declared.items() if self._models.get(n) == m.declaration}

    def declaration(self, name: str) -> ModelDeclaration | None:
        """The declaration of the model ``name``, or ``None`` when ``name`` is a Python plugin."""
        return self._models.get(name)

    def names(self) -> list[str]:
        """Names of every registered algorithm (loaded or not) and declared model."""
        return sorted({*self._entry_points, *self._models})

    def get(self, name: str) -> Algorithm:
        """Load (once) and return the algorithm ``name``.

        Raises
        ------
        PluginLoadError
            No such algorithm, or its plugin failed to load or does not declare a spec.
        """
        if name in self._models:
            if name not in self._declared:
                from ainode_sdk.declared.model import DeclaredModel

                try:
                    self._declared[name] = DeclaredModel(name, self._models[name])
                except ValueError as exc:
                    raise PluginLoadError(f"model {name!r}: {exc}") from None
            return self._declared[name]
        if name in self._loaded:
            return self._loaded[name]
        ep = self._entry_points.get(name)
        if ep is None:
            raise PluginLoadError(f"no algorithm named {name!r} (registered: {', '.join(self.names()) or 'none'})")
        try:
            factory = ep.load()
            algorithm = factory()
        except Exception as exc:  # plugin boundary: report, never crash the node
            logger.exception("algorithm plugin %s failed to load", name)
            raise PluginLoadError(f"algorithm {name!r} failed to load: {exc}") from exc
        if not isinstance(algorithm, Algorithm):
            raise PluginLoadError(f"algorithm {name!r} does not provide spec and run()")
        self._loaded[name] = algorithm
        return algorithm

    def entry_point(self, name: str) -> str:
        """``module:attribute`` of the algorithm ``name`` (to load it in another process)."""
        ep = self._entry_points.get(name)
        if ep is None:
            raise PluginLoadError(f"no algorithm named {name!r}")
        return str(ep.value)

    def specs(self) -> list[AlgorithmSpec]:
        """Specs of every algorithm that loads (failures are logged and skipped)."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name).spec)
            except PluginLoadError:
                continue
        return out
