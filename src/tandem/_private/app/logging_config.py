"""``LoggingConfig``: how a deployment's replicas log (the fields of Ray Serve's).

A deployment takes it as ``logging_config=`` (a ``LoggingConfig`` or a dict of
its fields); replica/logs.py applies it. Bad values fail here, when the
deployment is declared, not when a replica starts.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tandem._private.log_format import STANDARD_LOG_ATTRIBUTES

DEFAULT_LOG_LEVEL = "INFO"


class LoggingConfig(BaseModel):
    """The logs of a deployment's replicas: their level, encoding, access log and folder.

    ``log_level`` is the level of the ``tandem.replica`` logger (and its children)
    in the deployment's replicas; ``encoding`` ``"TEXT"`` or ``"JSON"`` (one object
    per line) formats their records with the application, deployment, replica and
    request id; ``enable_access_log`` adds one line per request; ``logs_dir``
    also writes each replica's lines to a file of its own in that folder;
    ``additional_log_standard_attrs`` adds LogRecord attributes (e.g. ``"name"``)
    to every line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoding: Literal["TEXT", "JSON"] = "TEXT"
    log_level: str = DEFAULT_LOG_LEVEL
    logs_dir: str | None = Field(default=None, min_length=1)
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() in ("TEXT", "JSON"):
            return value.upper()
        raise ValueError(f"must be 'TEXT' or 'JSON', got {value!r}")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        """A level name (any case) or number, as the name: ``10`` and ``"debug"`` are "DEBUG"."""
        if isinstance(value, int) and not isinstance(value, bool):
            name = logging.getLevelName(value)
            if not name.startswith("Level "):
                return str(name)
        elif isinstance(value, str) and isinstance(logging.getLevelName(value.upper()), int):
            return str(logging.getLevelName(logging.getLevelName(value.upper())))
        raise ValueError(
            "must be a logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (or its number), "
            f"got {value!r}"
        )

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _standard(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - STANDARD_LOG_ATTRIBUTES)
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a LogRecord attribute; use some of "
                + ", ".join(sorted(STANDARD_LOG_ATTRIBUTES))
            )
        return list(dict.fromkeys(value))

    @property
    def level(self) -> int:
        """``log_level`` as a number."""
        return int(logging.getLevelName(self.log_level))
