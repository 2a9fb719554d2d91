"""Configuration schemas users import by name: ``from ray.serve.schema import
LoggingConfig`` becomes ``from tandem.schema import LoggingConfig``."""

from tandem._private.app.logging_config import LoggingConfig

__all__ = ["LoggingConfig"]
