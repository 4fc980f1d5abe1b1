"""Value types shared by the configuration models (:mod:`node.settings.config`, :mod:`node.settings.console`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")]
"""An AE title: 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 6.2)."""

Port = Annotated[int, Field(ge=1, le=65535)]
