"""A 3-stage token pipeline (tokenizer -> model -> detokenizer, each a deployment):
composed streams vs the same stages called item by item, on tandem and Ray Serve.

``composed`` (tandem only): each stage is a streaming method that takes the
previous stage's DeploymentResponseGenerator as its argument, one line each:

    tokens = tokenizer.options(stream=True).tokenize.remote(n)
    ids = model.options(stream=True).generate.remote(tokens)
    text = detokenizer.options(stream=True).detokenize.remote(ids)

``composed, chunked`` (tandem only): the same, with
``stream_chunk_ms=--chunk-ms`` on every stream, so items that come within that
window cross between processes together.

``item by item`` (what Ray Serve allows, as it refuses a generator as an
argument): the ingress reads the tokenizer's stream and calls the model and the
detokenizer once per token, re-streaming each piece.

Prints, per backend and way, tokens/s and time to first token (median of the
rounds), and the composed/item-by-item ratio of the same run. Then, with
``--chunk-ms``, one hop alone: a replica reading 50,000 items from another
replica's stream, items/s with and without ``stream_chunk_ms``.

Usage: python benchmarks/streaming.py [--backends local,process] [--tokens 1000]
                                      [--rounds 5] [--chunk-ms 5] [--ray-serve]
``--ray-serve`` also runs the item-by-item pipeline on Ray Serve (needs
``ray[serve]``; a fresh local Ray in a child process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any


def build(serve: Any, composed: bool, chunk_ms: float = 0) -> Any:
    """The pipeline app, written against either framework's ``serve``."""
    # stream_chunk_ms is tandem's own: only passed when asked for.
    chunked = {"stream_chunk_ms": chunk_ms} if chunk_ms else {}

    @serve.deployment
    class Tokenizer:
        async def tokenize(self, n: int) -> Any:
            for i in range(n):
                yield i

    @serve.deployment
    class Model:
        async def generate(self, tokens: Any) -> Any:  # composed: a stream in, one out
            async for token in tokens:
                yield token * 7 % 1000

        def step(self, token: int) -> int:  # item by item
            return token * 7 % 1000

    @serve.deployment
    class Detokenizer:
        async def detokenize(self, ids: Any) -> Any:
            async for token_id in ids:
                yield f"<{token_id}>"

        def piece(self, token_id: int) -> str:
            return f"<{token_id}>"

    @serve.deployment
    class Pipeline:
        def __init__(self, tokenizer: Any, model: Any, detokenizer: Any) -> None:
            self.tokenizer = tokenizer
            self.model = model
            self.detokenizer = detokenizer

        async def run(self, n: int) -> Any:
            tokens = self.tokenizer.options(stream=True, **chunked).tokenize.remote(n)
            if composed:
                ids = self.model.options(stream=True, **chunked).generate.remote(tokens)
                text = self.detokenizer.options(stream=True, **chunked).detokenize.remote(ids)
                async for piece in text:
                    yield piece
                return
            async for token in tokens:
                token_id = await self.model.step.remote(token)
                yield await self.detokenizer.piece.remote(token_id)

    return Pipeline.bind(Tokenizer.bind(), Model.bind(), Detokenizer.bind())


def measure(handle: Any, tokens: int, rounds: int, chunk_ms: float = 0) -> dict[str, float]:
    """Tokens/s and time to first token over ``rounds`` runs (after one warm-up)."""
    chunked = {"stream_chunk_ms": chunk_ms} if chunk_ms else {}
    stream = handle.options(stream=True, **chunked).run
    list(stream.remote(10))  # warm-up: connections, first calls
    rates, firsts = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        first = None
        count = 0
        for _piece in stream.remote(tokens):
            if first is None:
                first = time.perf_counter() - started
            count += 1
        elapsed = time.perf_counter() - started
        assert count == tokens, (count, tokens)
        rates.append(tokens / elapsed)
        firsts.append(first or 0.0)
    return {"rate": statistics.median(rates), "first": statistics.median(firsts)}


def run_tandem(
    backend: str, tokens: int, rounds: int, chunk_ms: float
) -> dict[str, dict[str, float]]:
    import tandem as serve

    results = {}
    ways = [("composed", True, 0.0), ("item by item", False, 0.0)]
    if chunk_ms:
        ways.insert(1, (f"composed, chunked {chunk_ms:g} ms", True, chunk_ms))
    for way, composed, chunk in ways:
        app = build(serve, composed, chunk)
        handle = serve.run(app, backend=backend, route_prefix=None)
        results[way] = measure(handle, tokens, rounds, chunk)
        serve.shutdown()
    return results


HOP_ITEMS = 50_000


def build_hop(serve: Any) -> Any:
    """A reader replica that times reading a source replica's stream."""

    @serve.deployment
    class Source:
        async def items(self, n: int) -> Any:
            for i in range(n):
                yield i

    @serve.deployment
    class Reader:
        def __init__(self, source: Any) -> None:
            self.source = source

        async def read(self, n: int, chunk_ms: float) -> float:
            chunked = {"stream_chunk_ms": chunk_ms} if chunk_ms else {}
            stream = self.source.options(stream=True, **chunked).items
            started = time.perf_counter()
            count = 0
            async for _ in stream.remote(n):
                count += 1
            assert count == n, (count, n)
            return n / (time.perf_counter() - started)

    return Reader.bind(Source.bind())


def run_hop(backend: str, rounds: int, chunk_ms: float) -> dict[float, float]:
    """Median items/s of one replica reading another's stream, by stream_chunk_ms."""
    import tandem as serve

    handle = serve.run(build_hop(serve), backend=backend, route_prefix=None)
    handle.read.remote(1000, 0).result()  # warm-up
    rates: dict[float, list[float]] = {0.0: [], chunk_ms: []}
    for _ in range(rounds):  # alternating, so both see the same machine
        for chunk in rates:
            rates[chunk].append(handle.read.remote(HOP_ITEMS, chunk).result())
    serve.shutdown()
    return {chunk: statistics.median(values) for chunk, values in rates.items()}


def run_ray_serve(tokens: int, rounds: int) -> dict[str, float]:
    """In a child process: the item-by-item pipeline on Ray Serve."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")
    handle = serve.run(build(serve, composed=False), route_prefix=None)
    result = measure(handle, tokens, rounds)
    serve.shutdown()
    ray.shutdown()
    return result


def line(name: str, way: str, result: dict[str, float]) -> str:
    return (
        f"{name:<16} {way:<24} {result['rate']:>9,.0f} tokens/s   "
        f"first token {result['first'] * 1000:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="local,process")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-ms", type=float, default=5.0, help="0: no chunked row")
    parser.add_argument("--ray-serve", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ray-serve":
        print(json.dumps(run_ray_serve(args.tokens, args.rounds)))
        return
    print(f"{args.tokens} tokens through 3 stages, median of {args.rounds} rounds")
    for backend in args.backends.split(","):
        results = run_tandem(backend, args.tokens, args.rounds, args.chunk_ms)
        for way, result in results.items():
            print(line(f"tandem {backend}", way, result))
        single = results["item by item"]
        for way, result in results.items():
            if way != "item by item":
                print(
                    f"{'':16} {way} / item by item: {result['rate'] / single['rate']:.1f}x "
                    f"tokens/s, first token {single['first'] / result['first']:.1f}x sooner"
                )
    for backend in args.backends.split(",") if args.chunk_ms else ():
        hop = run_hop(backend, args.rounds, args.chunk_ms)
        plain, chunked = hop[0.0], hop[args.chunk_ms]
        print(
            f"one hop, {backend}: {HOP_ITEMS:,} items replica to replica: {plain:,.0f} items/s, "
            f"chunked {args.chunk_ms:g} ms {chunked:,.0f} items/s ({chunked / plain:.1f}x)"
        )
    if args.ray_serve:
        command = [sys.executable, __file__, "--child", "ray-serve"]
        command += ["--tokens", str(args.tokens), "--rounds", str(args.rounds)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(f"Ray Serve: failed ({out.stderr.strip().splitlines()[-1:]})")
            return
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(line("Ray Serve", "item by item", result))


if __name__ == "__main__":
    main()
