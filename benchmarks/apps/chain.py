"""The seed's chain app (Ingress -> Adder -> Multiplier), for any framework's ``serve``.

Both tandem and Ray Serve run this same code in the benchmarks; only the
module passed as ``serve`` differs.
"""

from __future__ import annotations

from typing import Any


def build_app(serve: Any) -> Any:
    """The seed's chain application, written against either framework's ``serve``."""

    @serve.deployment
    class Adder:
        def __init__(self, increment: int):
            self._increment = increment

        def __call__(self, val: int) -> int:
            return val + self._increment

    @serve.deployment
    class Multiplier:
        def __init__(self, multiple: int):
            self._multiple = multiple

        def __call__(self, val: int) -> int:
            return val * self._multiple

    @serve.deployment
    class Ingress:
        def __init__(self, adder: Any, multiplier: Any):
            self._adder = adder
            self._multiplier = multiplier

        async def __call__(self, input: int) -> int:
            adder_response = self._adder.remote(input)
            multiplier_response = self._multiplier.remote(adder_response)
            return await multiplier_response

    return Ingress.bind(Adder.bind(increment=1), Multiplier.bind(multiple=2))
