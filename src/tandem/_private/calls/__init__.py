"""Calls between deployments, in every process that makes them: the runtime (tandem's
event loop and its routers), routing, request context and the responses a handle returns."""
