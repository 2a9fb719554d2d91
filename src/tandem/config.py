"""Configuration classes users import by name: ``from ray.serve.config import
AutoscalingConfig`` becomes ``from tandem.config import AutoscalingConfig``."""

from tandem._private.app.autoscaling_config import AutoscalingConfig
from tandem._private.app.request_router_config import RequestRouterConfig
from tandem._private.http.options import HTTPOptions

__all__ = ["AutoscalingConfig", "HTTPOptions", "RequestRouterConfig"]
