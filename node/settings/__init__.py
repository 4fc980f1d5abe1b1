"""Loading and validating ``ainode.yaml``; errors name the file, the line, the key and the problem."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from node.conditions import RuleSyntaxError
from node.errors import ConfigError
from node.settings.config import DicomDestination, EnvKeySource, FileKeySource, FolderDestination, Peer, Settings
from node.settings.routes import Completion, Route

__all__ = [
    "ActiveSettings",
    "Completion",
    "DicomDestination",
    "EnvKeySource",
    "FileKeySource",
    "FolderDestination",
    "Peer",
    "Route",
    "Settings",
    "config_digest",
    "load_settings",
]


def _line_of(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest YAML node found along ``loc``."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = None
            for key, value in node.value:
                if str(key.value) == str(part):
                    found, line = value, key.start_mark.line + 1
                    break
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
        if node is None:
            break
    return line


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # pydantic adds the discriminator tag and validator names to union locations
    return tuple(p for p in loc if not (isinstance(p, str) and p in ("file", "env", "dicom", "folder")))


def load_settings(path: str | Path) -> Settings:
    """Read, parse and validate a configuration file.

    Raises
    ------
    ConfigError
        ``FILE:LINE: KEY: problem`` for the first problem found (YAML syntax, unknown key, wrong type,
        bad rule, dangling reference).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must be a mapping of sections (node, keys, peers, ...)")
    try:
        settings = Settings.model_validate(data)
        settings.set_digest(hashlib.sha256(text.encode("utf-8")).hexdigest())
        return settings
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _clean_loc(tuple(err["loc"]))
        original = err.get("ctx", {}).get("error")
        message = err["msg"].removeprefix("Value error, ")
        if isinstance(original, RuleSyntaxError):
            loc = loc + original.path
            message = original.message
        elif not loc and ": " in message:
            # model-level checks name their key as "a.b[2].c: problem"
            key, message = message.split(": ", 1)
            loc = tuple(int(p) if p.isdigit() else p for p in key.replace("[", ".").replace("]", "").split("."))
        if err["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        line = _line_of(root, loc)
        raise ConfigError(f"{path}:{line}: {_dotted(loc)}: {message}") from None


def config_digest(path: str | Path) -> str:
    """SHA-256 of the configuration file's bytes, for audit records of config changes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ActiveSettings:
    """The configuration in force: one holder that every long-lived object of a process reads
    (receiver, scheduler, pipeline, console). A reload replaces it here, once; work that must not
    change under a reload (a planned job) keeps its own snapshot.

    Parameters
    ----------
    settings
        The configuration loaded at start.
    """

    def __init__(self, settings: Settings) -> None:
        self._current = settings

    @property
    def current(self) -> Settings:
        """The configuration in force now."""
        return self._current

    def replace(self, settings: Settings) -> None:
        """Put ``settings`` in force (validated by the caller); an atomic reference swap."""
        self._current = settings

    @classmethod
    def of(cls, settings: Settings | ActiveSettings) -> ActiveSettings:
        """``settings`` as a holder (a plain configuration gets a holder of its own)."""
        return settings if isinstance(settings, ActiveSettings) else cls(settings)
