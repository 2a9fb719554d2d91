"""Dynamic batching: a vectorised NumPy model with @batch vs without, 32 callers.

The model runs 1000 tiny dense layers (16 x 16), so most of a call is
per-operation overhead, which a batch pays once for all its calls (as GPU
kernel launches are). Without batching each call does one matrix-vector
product per layer; with @batch, calls that arrive together share one
matrix-matrix product per layer (target: >= 5x the calls/s). The load comes
from a deployment in the same application (32 concurrent callers).
Usage: python benchmarks/batching.py [--backend process] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

import tandem as serve

SIZE = 16
CALLERS = 32
LAYERS = 1000


class _Model:
    def __init__(self) -> None:
        self.weights = np.random.default_rng(0).random((SIZE, SIZE))

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        # A small MLP layer stack: each step is a dense product plus a nonlinearity.
        out = inputs
        for _ in range(LAYERS):
            out = np.tanh(out @ self.weights / SIZE)
        return out


@serve.deployment(max_ongoing_requests=CALLERS)
class Unbatched(_Model):
    async def __call__(self, x: np.ndarray) -> float:
        return float(self.predict(x[None, :])[0, 0])


@serve.deployment(max_ongoing_requests=CALLERS)
class Batched(_Model):
    @serve.batch(max_batch_size=CALLERS, batch_wait_timeout_s=0.002)
    async def predict_batch(self, xs: list[np.ndarray]) -> list[float]:
        return [float(v) for v in self.predict(np.stack(xs))[:, 0]]

    async def __call__(self, x: np.ndarray) -> float:
        return await self.predict_batch(x)


@serve.deployment
class LoadGenerator:
    """Calls the model from 32 concurrent callers, from inside the application."""

    def __init__(self, model: serve.DeploymentHandle) -> None:
        self.model = model

    async def run(self, seconds: float) -> float:
        x = np.random.default_rng(1).random(SIZE)
        done = 0
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await self.model.remote(x)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="process")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rates = {}
    for name, deployment in (("without @batch", Unbatched), ("with @batch", Batched)):
        app = LoadGenerator.bind(deployment.bind())
        handle = serve.run(app, name=name, route_prefix=None, backend=args.backend)
        handle.run.remote(1.0).result()  # warm up
        rates[name] = handle.run.remote(args.seconds).result()
        serve.delete(name)
    serve.shutdown()
    for name, rate in rates.items():
        print(f"{name:>15}: {rate:,.0f} calls/s ({CALLERS} concurrent callers, {args.backend})")
    print(f"with / without: {rates['with @batch'] / rates['without @batch']:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
