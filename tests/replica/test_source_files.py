"""Tracebacks from replicas in other processes name the user's file and line, not
``<dynamic-code>`` (the deployment's class crosses by value)."""

from __future__ import annotations

from typing import Any

import pytest

import tandem as serve
from helpers import eventually
from tandem._private.calls.runtime import current_runtime
from tandem._private.replica.source_files import restore


def _helper(value: int) -> int:
    if value < 0:
        raise ValueError("negative input")  # RAISED HERE
    return value


@serve.deployment
class Checker:
    def __call__(self, value: int) -> int:
        return _helper(value)

    @property
    def name(self) -> str:
        return "checker"


def _raise_line() -> int:
    with open(__file__) as source:
        return next(n for n, line in enumerate(source, 1) if "# RAISED HERE" in line)


def _failed_lines() -> list[dict[str, Any]]:
    runtime = current_runtime()
    assert runtime is not None and runtime.controller is not None
    lines, _ = runtime.run_sync(runtime.controller.recent_logs(deployment="Checker"))
    return [line for line in lines if line["exception"]]


def test_a_replica_elsewhere_names_the_users_file_in_tracebacks(remote_backend: str) -> None:
    checker = serve.run(Checker.bind(), backend=remote_backend, route_prefix=None)
    with pytest.raises(ValueError, match="negative input"):
        checker.remote(-1).result(timeout_s=30)
    [line] = eventually(_failed_lines, lambda lines: len(lines) == 1)
    assert f'File "{__file__}", line {_raise_line()}, in _helper' in line["exception"]
    assert "<dynamic-code>" not in line["exception"]


def test_only_code_that_lost_its_file_is_renamed() -> None:
    def wrapper() -> None:  # stands for a decorator's code from another module
        pass

    wrapper.__module__ = "some.library"
    lost = _helper.__code__.replace(co_filename="<dynamic-code>")

    class Target:
        pass

    Target.__module__ = __name__
    Target.method = _helper  # type: ignore[attr-defined]
    Target.wrapped = wrapper  # type: ignore[attr-defined]
    wrapper.__code__ = wrapper.__code__.replace(co_filename="<dynamic-code>")
    original = _helper.__code__
    try:
        _helper.__code__ = lost
        restore(Target, "/src/app.py")
        assert _helper.__code__.co_filename == "/src/app.py"
        assert _helper.__code__.co_firstlineno == original.co_firstlineno
        assert wrapper.__code__.co_filename == "<dynamic-code>"
    finally:
        _helper.__code__ = original
