"""Model multiplexing: model loads over 200 requests, 2 replicas x 2 slots, 4 models.

Requests rotate over 4 model ids. Routing prefers replicas that already hold
the requested model, so once each replica holds two of the models nothing is
loaded again (target: <= 8 loads in all). Usage: python benchmarks/multiplex.py
"""

from __future__ import annotations

import argparse
import asyncio
import time

import tandem as serve


@serve.deployment(num_replicas=2, max_ongoing_requests=4)
class Models:
    def __init__(self) -> None:
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads += 1
        await asyncio.sleep(0.05)  # loading a model takes a while
        return model_id

    async def __call__(self, x: int) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return f"{model}:{x}"

    def load_count(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id, self.loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="process")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    handle = serve.run(Models.bind(), backend=args.backend, route_prefix=None)
    models = ["a", "b", "c", "d"]
    start = time.perf_counter()
    for i in range(args.requests):
        model = models[i % len(models)]
        assert handle.options(multiplexed_model_id=model).remote(i).result() == f"{model}:{i}"
    elapsed = time.perf_counter() - start
    loads: dict[str, int] = {}
    while len(loads) < 2:  # ask until both replicas have answered
        replica_id, count = handle.load_count.remote().result()
        loads[replica_id] = count
    print(
        f"{args.requests} requests over 4 models, 2 replicas x 2 slots ({args.backend}): "
        f"{sum(loads.values())} model loads (target <= 8; per replica: {sorted(loads.values())}), "
        f"{elapsed / args.requests * 1e3:.2f} ms per request"
    )
    serve.shutdown()


if __name__ == "__main__":
    main()
